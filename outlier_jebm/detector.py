"""``JEBMDetector``: the model behind PyOD's detector contract, on the CLI's code path."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .config import Config, default_config_path
from .data import to_unit_range
from .model import JointEBM
from .scoring import Scorer, calibrate
from .train import fit, resolve_device, seed_everything


class JEBMDetector:
    """Unsupervised image outlier detector with a joint latent-space EBM prior.

    Parameters
    ----------
    config : Config, optional
        Model, training and scoring configuration (default: ``configs/mnist.yaml``).
    contamination : float
        Expected share of outliers; the threshold is the (1 - contamination)
        quantile of held-in validation scores (``score.false_alarm_rate``).
    image_size : int, optional
        Side of the square images (default: the config's).
    val_fraction : float
        Share of the training images held in for calibration.
    model_dir : path, optional
        Where the fitted model directory is written (default: a temporary directory).
    device : str
        ``auto``, ``cpu`` or ``cuda``.

    Attributes
    ----------
    decision_scores_ : ndarray (n_samples,)
        Outlier scores of the training data (higher = more abnormal).
    threshold_ : float
        Scores above it are labelled 1 (outlier).
    labels_ : ndarray (n_samples,)
        0/1 labels of the training data.
    model_dir_ : Path
        The fitted model directory (config, weights, calibration).
    """

    def __init__(self, config: Config | None = None, contamination: float = 0.05, *, image_size: int | None = None,
                 val_fraction: float = 0.1, model_dir: str | Path | None = None, device: str = "auto"):
        self.config = config
        self.contamination = contamination
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.model_dir = model_dir
        self.device = device

    def fit(self, X, y=None) -> "JEBMDetector":
        """Fit on images X: (n, H*W) or (n, H, W), floats in [0, 1] or integers 0-255. y is ignored."""
        if not 0.0 < self.contamination < 0.5:
            raise ValueError(f"contamination must be in (0, 0.5), got {self.contamination}")
        cfg = self.config or Config.from_yaml(default_config_path())
        size = self.image_size or cfg.model.image_size
        cfg = cfg.with_overrides(model={"image_size": size}, score={"false_alarm_rate": self.contamination})
        images = to_unit_range(np.asarray(X), size, name="X")
        rng = np.random.default_rng(cfg.train.seed)
        order = rng.permutation(len(images))
        n_val = max(2, int(round(self.val_fraction * len(images))))
        val, train = images[order[:n_val]], images[order[n_val:]]
        if self.model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jebm-detector-")
            out = Path(self._tmp.name)
        else:
            out = Path(self.model_dir)
        device = resolve_device(self.device)
        seed_everything(cfg.train.seed)
        fit(JointEBM(cfg.model), cfg, train, val, out, device=device, meta={"data": "JEBMDetector.fit", "holdout": None})
        loaded = load_model(out, device=device)
        cal = calibrate(loaded, train, val, seed=cfg.train.seed, device=device)
        self.model_dir_ = out
        self._scorer = Scorer(loaded, device=device)
        self.threshold_ = float(cal.threshold)
        self.decision_scores_ = self._scorer.score(images)["score"]
        self.labels_ = (self.decision_scores_ > self.threshold_).astype(int)
        return self

    def _table(self, X) -> dict[str, np.ndarray]:
        if not hasattr(self, "_scorer"):
            raise RuntimeError("this JEBMDetector is not fitted yet: call fit(X) first")
        return self._scorer.score(to_unit_range(np.asarray(X), self._scorer.image_size, name="X"))

    def decision_function(self, X) -> np.ndarray:
        """Outlier scores (higher = more abnormal), shape (n_samples,)."""
        return self._table(X)["score"]

    def predict(self, X) -> np.ndarray:
        """0 (inlier) / 1 (outlier) for each sample."""
        return (self.decision_function(X) > self.threshold_).astype(int)

    def predict_proba(self, X, method: str = "calibrated") -> np.ndarray:
        """(n_samples, 2): probability-like [inlier, outlier], the outlier column is ``score_normalized``
        (0.5 exactly at the threshold)."""
        p = self._table(X)["score_normalized"]
        return np.stack([1.0 - p, p], axis=1)

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_

    def get_params(self, deep: bool = True) -> dict:
        return {"config": self.config, "contamination": self.contamination, "image_size": self.image_size,
                "val_fraction": self.val_fraction, "model_dir": self.model_dir, "device": self.device}

    def set_params(self, **params) -> "JEBMDetector":
        for k, v in params.items():
            setattr(self, k, v)
        return self
