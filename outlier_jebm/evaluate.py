"""Detection quality on a labelled test set: one metric code path for ``evaluate`` and ``bench``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score, roc_curve


def detection_metrics(is_anomaly: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUPRC (anomaly = positive class, the headline metric) and AUROC of a score.

    Parameters
    ----------
    is_anomaly : np.ndarray
        1 for an anomaly, 0 for a normal input.
    scores : np.ndarray
        Higher = more anomalous. NaN counts as the most anomalous (a model that cannot score an
        input should not be rewarded for it).

    Returns
    -------
    dict
        ``{"auprc": float, "auroc": float}``.
    """
    y = np.asarray(is_anomaly).astype(int)
    s = _ranked(scores)
    return {"auprc": float(average_precision_score(y, s)), "auroc": float(roc_auc_score(y, s))}


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Scores to rank by: NaN and +inf as the most anomalous, -inf as the least, every value finite."""
    big = np.finfo(np.float64).max
    return np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=big, posinf=big, neginf=-big)


def threshold_metrics(is_anomaly: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    y = np.asarray(is_anomaly).astype(int)
    pred = np.asarray(labels).astype(int)
    normal = y == 0
    return {
        "f1": float(f1_score(y, pred, zero_division=0)),
        "false_alarm_rate": float(pred[normal].mean()) if normal.any() else float("nan"),
        "recall": float(pred[~normal].mean()) if (~normal).any() else float("nan"),
    }


@dataclass
class Evaluation:
    metrics: dict[str, float]
    component_auprc: dict[str, float] = field(default_factory=dict)
    component_auroc: dict[str, float] = field(default_factory=dict)


def evaluate_scores(is_anomaly: np.ndarray, table: dict[str, np.ndarray], component_names: list[str]) -> Evaluation:
    metrics = detection_metrics(is_anomaly, table["score"])
    metrics.update(threshold_metrics(is_anomaly, table["label"]))
    metrics["n_test"] = int(len(is_anomaly))
    metrics["anomaly_rate"] = float(np.mean(is_anomaly))
    per_auprc, per_auroc = {}, {}
    for name in component_names:
        values = np.asarray(table[name], dtype=np.float64)
        if np.ptp(values) == 0:
            continue
        m = detection_metrics(is_anomaly, values)
        per_auprc[name], per_auroc[name] = m["auprc"], m["auroc"]
    return Evaluation(metrics=metrics, component_auprc=per_auprc, component_auroc=per_auroc)


def curve_figures(is_anomaly: np.ndarray, scores: np.ndarray, threshold: float | None, title: str) -> dict:
    """PR curve, ROC curve and score histograms as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(is_anomaly).astype(int)
    finite = np.isfinite(np.asarray(scores, dtype=np.float64))
    scores = _ranked(scores)  # ranked as detection_metrics ranks them; the histogram shows the finite ones
    figs = {}
    p, r, _ = precision_recall_curve(y, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(r, p)
    ax.axhline(y.mean(), ls="--", c="gray", label=f"chance {y.mean():.3f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"PR: {title}")
    ax.legend()
    figs["pr_curve.png"] = fig
    fpr, tpr, _ = roc_curve(y, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], ls="--", c="gray")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title}")
    figs["roc_curve.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lo, hi = np.quantile(scores[finite], [0.001, 0.999]) if finite.any() else (0.0, 1.0)
    bins = np.linspace(lo, hi, 60)
    ax.hist(scores[finite & (y == 0)], bins=bins, alpha=0.6, density=True, label="normal")
    ax.hist(scores[finite & (y == 1)], bins=bins, alpha=0.6, density=True, label="anomaly")

    if threshold is not None:
        ax.axvline(threshold, c="k", ls="--", label="threshold")
    hidden = f" ({int((~finite).sum())} non-finite not shown)" if not finite.all() else ""
    ax.set(xlabel="score", title=f"scores: {title}{hidden}")
    ax.legend()
    figs["score_histogram.png"] = fig
    for f in figs.values():
        f.tight_layout()
    return figs
