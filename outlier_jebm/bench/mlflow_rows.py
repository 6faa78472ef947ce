"""One MLflow run per bench row: tags, the detector's settings, metrics, and a PR curve for whole scores."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .detectors import _plain
from .report import pr_figure

if TYPE_CHECKING:
    from .runner import BenchSpec


def log_cell(
    spec: BenchSpec,
    row: dict[str, Any],
    params: dict[str, Any],
    extra: dict[str, Any],
    labels: np.ndarray,
    scores: np.ndarray | None,
) -> str:
    """One MLflow run per row: tags, the detector's settings, metrics, and a PR curve for whole scores."""
    from ..tracking import Tracker

    status = "FINISHED" if row["status"] == "ok" else "FAILED"
    split = row.get("split") or "clean"
    run_name = f"bench-{row['detector']}-holdout{row['holdout']}-seed{row['seed']}" + (
        "" if split == "clean" else f"-{split}"
    )
    with Tracker(spec.tracking_uri, run_name=run_name) as tr:
        tr.set_tags(
            {
                "job": "bench",
                "detector": row["detector"],
                "holdout": row["holdout"],
                "seed": row["seed"],
                "split": split,
                "family": row["family"],
                "model": row["model"],
                "score": row["score"],
                "data": spec.data,
                "status": row["status"],
            }
        )
        tr.log_params(
            {**{k: _plain(v) for k, v in params.items()}, "max_train": spec.max_train, "n_train": row["n_train"]}
        )
        tr.log_metrics(
            {
                k: row[k]
                for k in (
                    "auprc",
                    "auroc",
                    "fit_seconds",
                    "score_images_per_second",
                    "n_test",
                    "anomaly_rate",
                    "nonfinite_scores",
                )
                if row[k] != ""
            }
        )
        for epoch, metrics in enumerate(extra.get("history", [])):
            tr.log_metrics({f"fit.{k}": v for k, v in metrics.items() if _finite_number(v)}, step=epoch + 1)
        if scores is not None and not row["score"].startswith("component"):
            import matplotlib.pyplot as plt

            fig = pr_figure({row["detector"]: (labels, scores)}, f"holdout {row['holdout']}, seed {row['seed']}")
            tr.log_figure(fig, "pr_curve.png")
            plt.close(fig)
        if status != "FINISHED":
            tr.end(status)
        return tr.run_id


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
