"""The benchmark's detectors: PyOD's, with the settings used on pixels and why, and jebm variants.

A jebm variant is the base config plus validated overrides (``Config.override``); the
published figures the report compares against are kept here with their source.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Config, ConfigError, for_vectors

# Cui, Wu and Han, ICCV 2023 (the joint latent EBM paper), Table 3: AUPRC, MNIST hold-out-one-digit.
# The papers score with log p(x, z) and average over their last 10 training epochs.
PUBLISHED_AUPRC: dict[str, dict[int, float]] = {
    "joint latent EBM (published)": {1: 0.722, 4: 0.949, 5: 0.980, 7: 0.941, 9: 0.935},
    "HVAE (published)": {1: 0.494, 4: 0.920, 5: 0.913, 7: 0.680, 9: 0.791},
    "LEBM (published)": {1: 0.336, 4: 0.630, 5: 0.619, 7: 0.463, 9: 0.413},
}

PIXEL_INPUT = "image pixels in [0, 1], flattened to H*W features, no further scaling"

VECTOR_INPUT = (
    "feature vectors standardised with the mean and std of the training part (train + held-in "
    "validation), the same input for every PyOD detector; jebm standardises its own training part"
)

# short names for config paths in jebm variants (``jebm:prior=gaussian``); full dotted paths work too
SHORTHANDS = {
    "prior": "model.prior",
    "generator": "model.generator",
    "z_dims": "model.z_dims",
    "scheme": "train.scheme",
    "epochs": "train.epochs",
    "prior_steps": "train.prior_langevin.steps",
    "posterior_steps": "train.posterior_langevin.steps",
    "steps": "score.steps",  # K posterior steps at scoring time, as `jebm-od score --steps`
}


class BenchError(ValueError):
    """A benchmark request that cannot run as written (unknown detector, bad override, ...)."""


@dataclass(frozen=True)
class PyODDetector:
    """One PyOD detector as the benchmark runs it: class, settings and the reason for each change."""

    name: str
    cls_path: str  # "pyod.models.knn.KNN"
    settings: dict[str, Any]  # constructor arguments that differ from PyOD's defaults
    why: str
    seeded: bool = False  # takes random_state=seed
    needs_n_features: bool = False

    def build(self, seed: int, n_features: int):
        module, cls = self.cls_path.rsplit(".", 1)
        kwargs = dict(self.settings)
        if self.seeded:
            kwargs["random_state"] = seed
        if self.needs_n_features:
            kwargs["n_features"] = n_features
        return getattr(importlib.import_module(module), cls)(**kwargs)

    def describe(self, seed: int = 0, n_features: int = 784) -> dict[str, Any]:
        """Every constructor argument (defaults included), the input scaling and the reasons."""
        params = {k: _plain(v) for k, v in self.build(seed, n_features).get_params().items()}
        return {
            "family": "pyod",
            "class": self.cls_path,
            "changed_from_defaults": dict(self.settings),
            "params": params,
            "input": PIXEL_INPUT,
            "why": self.why,
        }


_DEFAULTS = "PyOD's defaults (contamination only sets PyOD's own threshold, which is not used here)."

_DEEP = (
    "10 epochs for every deep detector (AutoEncoder's default; VAE's is 30 and DeepSVDD's 100), an equal "
    "and bounded CPU budget; preprocessing off: PyOD's StandardScaler divides near-constant border "
    "pixels by a near-zero spread and blows their noise up, while [0, 1] pixels are already well "
    "scaled for a network; verbose off (no progress bars in the log)."
)

PYOD_DETECTORS: dict[str, PyODDetector] = {
    d.name: d
    for d in [
        PyODDetector(
            "knn", "pyod.models.knn.KNN", {}, _DEFAULTS + " Score: distance to the 5th nearest training image."
        ),
        PyODDetector("lof", "pyod.models.lof.LOF", {}, _DEFAULTS),
        PyODDetector(
            "iforest", "pyod.models.iforest.IForest", {}, _DEFAULTS + " random_state = the split's seed.", seeded=True
        ),
        PyODDetector("ecod", "pyod.models.ecod.ECOD", {}, _DEFAULTS),
        PyODDetector("copod", "pyod.models.copod.COPOD", {}, _DEFAULTS),
        PyODDetector("hbos", "pyod.models.hbos.HBOS", {}, _DEFAULTS),
        PyODDetector("loda", "pyod.models.loda.LODA", {}, _DEFAULTS + " random_state = the split's seed.", seeded=True),
        PyODDetector(
            "pca",
            "pyod.models.pca.PCA",
            {"n_components": 0.95, "svd_solver": "full", "standardization": False},
            "PyOD's defaults keep every component and divide by each one's explained variance; on pixels the "
            "last components have (near) zero variance and every score is infinite (the tests "
            "reproduce it on 8x8 digits). Kept: the components that explain 95 % of the training variance "
            "(svd_solver 'full' is what a variance fraction needs). Standardisation off: all pixels share one "
            "unit, and standardising near-constant border pixels amplifies their noise.",
        ),
        PyODDetector(
            "autoencoder",
            "pyod.models.auto_encoder.AutoEncoder",
            {"epoch_num": 10, "preprocessing": False, "verbose": 0},
            _DEEP,
            seeded=True,
        ),
        PyODDetector(
            "vae", "pyod.models.vae.VAE", {"epoch_num": 10, "preprocessing": False, "verbose": 0}, _DEEP, seeded=True
        ),
        PyODDetector(
            "deepsvdd",
            "pyod.models.deep_svdd.DeepSVDD",
            {"epochs": 10, "preprocessing": False, "verbose": 0},
            _DEEP,
            seeded=True,
            needs_n_features=True,
        ),
    ]
}


def pixel_features(images01: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) images in [0, 1] -> (N, H*W*C) float32: the PyOD detectors' input."""
    return np.ascontiguousarray(images01.reshape(len(images01), -1), dtype=np.float32)


def is_vector_split(td) -> bool:
    """Vectors come as (n, d), images as (n, H, W) or (n, H, W, C)."""
    return td.train.ndim == 2


def pyod_inputs(td) -> tuple[np.ndarray, np.ndarray]:
    """The PyOD detectors' training and test input for one split (``PIXEL_INPUT`` or ``VECTOR_INPUT``)."""
    X = pixel_features(np.concatenate([td.train, td.val]))  # the protocol's whole 80 %
    T = pixel_features(td.test)
    if is_vector_split(td):
        mean, std = X.mean(0), X.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        X, T = (X - mean) / std, (T - mean) / std
    return X, T


@dataclass
class JEBMVariant:
    """A jebm configuration in the benchmark: the base config plus overrides, and its component rows."""

    name: str
    overrides: dict[str, Any]
    config: Config
    components: list[str] | None = None  # None: every component that is not constant on the test set

    def describe(self) -> dict[str, Any]:
        return {
            "family": "jebm",
            "overrides": self.overrides,
            "config": self.config.to_dict(),
            "components": self.components or "all (constant ones left out)",
            "input": (
                "feature vectors, standardised inside the model (model.standardize)"
                if self.config.model.is_vector
                else "image pixels in [0, 1], scaled to [-1, 1] inside the model"
            ),
        }


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """``Config.override``, its errors worded for the benchmark's command line (with the shorthands)."""
    try:
        return config.override(overrides)
    except ConfigError as exc:
        raise BenchError(f"{exc} (shorthands: {', '.join(SHORTHANDS)})") from None


def available_components(config: Config) -> set[str]:
    from ..model import JointEBM
    from ..scoring import component_names, posterior_averaged

    if config.model.is_vector:
        config = for_vectors(config, max(config.model.vector_dim, 1))
    return set(
        component_names(
            JointEBM(config.model),
            True,
            llr_samples=1,
            posterior=posterior_averaged(config.score),
            top_knn=config.score.top_knn,
        )
    )


def config_value(config: Config, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)
