"""Scores before and after a refactor: snapshot what a model gives through every path, then compare.

Scores fixed inputs (300 seeded random images; 50 of them as PNG files) with one saved model
through the library (``Scorer``, at K = 0 and K = 5), the command line (``jebm-od score``) and
the pyfunc model (``save_pyfunc`` then ``mlflow.pyfunc.load_model``), and writes them to OUT.

    git checkout OLD && python benchmarks/score_identity.py --model DIR --out before
    git checkout NEW && python benchmarks/score_identity.py --model DIR --out after --compare before

``--compare`` exits 1 unless every array and table is identical, bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def snapshot(model: str, out: Path) -> None:
    import mlflow

    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.registry import save_pyfunc
    from outlier_jebm.scoring import Scorer

    out.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).random((300, 28, 28)).astype(np.float32) ** 4
    arrays = {}
    for steps in (0, 5):
        for key, value in Scorer(load_model(model), steps=steps).score(images).items():
            arrays[f"K{steps}:{key}"] = value.astype(str) if value.dtype == object else value
    np.savez(out / "library.npz", **arrays)

    folder = out / "pngs"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images[:50]):
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    # the command line's module: cli.main in a checkout from before the namespace install (on PYTHONPATH)
    module = "cli.main" if importlib.util.find_spec("cli") else "jebm_od.cli.main"
    cli = [sys.executable, "-m", module, "score", str(folder), "--model", model, "--out", str(out / "cli.csv")]
    subprocess.run(cli, check=True, capture_output=True)
    table = pd.read_csv(out / "cli.csv")
    table["path"] = table["path"].map(lambda p: Path(p).name)  # the folder differs between snapshots
    table.to_csv(out / "cli.csv", index=False)

    with tempfile.TemporaryDirectory() as tmp:
        pyfunc = mlflow.pyfunc.load_model(str(save_pyfunc(model, Path(tmp) / "pyfunc")))
        pyfunc.predict(pd.DataFrame(images[:100].reshape(100, -1))).to_csv(out / "pyfunc.csv", index=False)


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    b, a = np.load(before / "library.npz"), np.load(after / "library.npz")
    if sorted(b.files) != sorted(a.files):
        problems.append(f"library: columns {sorted(b.files)} became {sorted(a.files)}")
    problems += [f"library: {k} differs" for k in b.files if k in a.files and not np.array_equal(b[k], a[k])]
    for name in ("cli.csv", "pyfunc.csv"):
        x, y = pd.read_csv(before / name), pd.read_csv(after / name)
        if not x.equals(y):
            problems.append(f"{name} differs")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a calibrated model directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="a snapshot taken before the change")
    args = ap.parse_args()
    snapshot(args.model, args.out)
    if args.compare:
        problems = compare(args.compare, args.out)
        print("\n".join(problems) or f"identical: library (K = 0 and 5), CLI and pyfunc scores of {args.model}")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
