"""What the per-model rescoring scripts share (``density_knn.py``, ``posterior_knn.py``, ``width_gate.py``).

Each takes ``--model DIR --out F [--label L]``, rebuilds the split the model was fitted on from its record, scores
it with the model's own ``Scorer`` and appends one CSV row per model,
named by ``ID_FIELDS``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def model_args(doc: str | None, **extra: dict) -> argparse.Namespace:
    """``--model`` (a fitted model directory), ``--label`` and ``--out`` (the CSV rows are appended to), and one
    option per ``extra`` entry (``shifts={"type": int, "default": 1}`` adds ``--shifts``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, required=True)
    for name, spec in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", **spec)
    return ap.parse_args()


@dataclass
class ModelOnSplit:
    loaded: Any  # outlier_jebm.checkpoint.LoadedModel
    td: Any  # the split it was fitted on
    y: np.ndarray  # 1 = anomaly, per test image
    scorer: Any  # outlier_jebm.scoring.Scorer


def load_on_split(model_dir: Path) -> ModelOnSplit:
    """The model, the split it was fitted on (a bench model of digit D and seed S: ``prepare_data(mnist, holdout=D,
    seed=S)``, rebuilt from its record) and its scorer, on the CPU."""
    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.pipeline import training_data_of
    from outlier_jebm.scoring import Scorer

    loaded = load_model(model_dir, device="cpu")
    td = training_data_of(loaded)
    return ModelOnSplit(loaded, td, np.asarray(td.test_is_anomaly).astype(int), Scorer(loaded, device="cpu"))


ID_FIELDS = ["label", "holdout", "seed", "model"]  # what names a row: the first columns of every script's CSV


def row_id(label: str, model_dir: Path, m: ModelOnSplit) -> dict:
    """The ``ID_FIELDS`` of the row of the model at ``model_dir``."""
    return {
        "label": label,
        "holdout": m.loaded.meta.get("holdout"),
        "seed": m.loaded.config.train.seed,
        "model": model_dir.name,
    }


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """Append ``row`` to the CSV at ``path``, writing the header first if the file is new."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)
