"""The benchmark: jebm models and PyOD detectors on the same hold-out splits, one metric code path.

For every held-out digit D and seed s, ``prepare_data(data, holdout=D, seed=s)`` makes one split
that every detector sees:

- PyOD detectors fit on the whole training part (train + held-in validation, the protocol's
  80 %) and score the test part. Their input is the image pixels in [0, 1], flattened, with no
  further scaling; where PyOD's own defaults are unsound on pixels the registry below says what
  was changed and why.
- jebm models train through ``pipeline.run_fit`` (the ``fit`` command's code path: training on
  the train part, calibration on the validation part) and score through ``Scorer``.
  A model gives one row for its default score and, from the same fit and the same scoring pass,
  one row per score component (``jebm[latent_knn]``).

Every row's AUPRC and AUROC come from ``evaluate.detection_metrics``. ``fit_seconds`` is the
wall time of ``fit(X)`` (PyOD) or of ``run_fit`` without MLflow logging (jebm: training and
calibration); ``score_images_per_second`` is the test set's size over the wall time of one
scoring pass. Results are written after every cell, so a stopped run keeps what it did.
"""

from .detectors import (
    PUBLISHED_AUPRC,
    PYOD_DETECTORS,
    SHORTHANDS,
    BenchError,
    JEBMVariant,
    PyODDetector,
    apply_overrides,
    available_components,
    config_value,
    pixel_features,
    pyod_inputs,
)
from .report import aggregate, bench_settings, machine_info, pr_figure, render_markdown, row_label
from .runner import COLUMNS, SKIPPED_BUDGET, BenchResult, BenchSpec, run_bench, write_csv

__all__ = [
    "COLUMNS",
    "PUBLISHED_AUPRC",
    "PYOD_DETECTORS",
    "SHORTHANDS",
    "SKIPPED_BUDGET",
    "BenchError",
    "BenchResult",
    "BenchSpec",
    "JEBMVariant",
    "PyODDetector",
    "aggregate",
    "apply_overrides",
    "available_components",
    "bench_settings",
    "config_value",
    "machine_info",
    "pixel_features",
    "pr_figure",
    "pyod_inputs",
    "render_markdown",
    "row_label",
    "run_bench",
    "write_csv",
]
