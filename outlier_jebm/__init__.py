"""jebm-od: anomaly detection with a joint latent-space EBM prior on a multi-layer generator.

The public API, importable from here (each name is loaded on first use, so ``import
outlier_jebm`` stays cheap)::

    from outlier_jebm import JEBMDetector            # a PyOD detector: fit / decision_function / predict
    from outlier_jebm import prepare_data, run_fit   # the `jebm-od fit` path: data, train, calibrate, log
    from outlier_jebm import load_model, Scorer      # score with a saved model

Everything else is reachable from its module (``outlier_jebm.scoring``, ``outlier_jebm.bench``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "JEBMDetector": "detector",
    "Config": "config",
    "ConfigError": "config",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "LoadedModel": "checkpoint",
    "Scorer": "scoring",
    "calibrate": "scoring",
    "Calibration": "calibration",
    "fit_calibration": "calibration",
    "prepare_data": "pipeline",
    "run_fit": "pipeline",
    "TrainingData": "pipeline",
    "load_dataset": "data",
    "load_mnist": "data",
    "holdout_split": "data",
    "read_image": "data",
    "DataError": "data",
    "score_files": "batch",
    "detection_metrics": "evaluate",
    "run_bench": "bench",
    "BenchSpec": "bench",
    "log_pyfunc": "registry",
    "save_pyfunc": "registry",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'outlier_jebm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
