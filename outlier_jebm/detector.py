"""``JEBMDetector``: the model as a PyOD detector, for plain vectors and images, on the CLI's code path."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from pyod.models.base import BaseDetector
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from .config import Config, default_config_path, for_vectors
from .data import DataError, to_unit_range

PREPROCESSING = ("standardize", "none")


class JEBMDetector(BaseDetector):
    """Unsupervised outlier detector: a multi-layer generator with a joint latent-space EBM prior.

    Fits on normal (or mostly normal) data and scores new samples by posterior inference in
    the latent space (see ``outlier_jebm.scoring``). Training, calibration and scoring go
    through the same code as ``jebm-od fit`` and ``jebm-od score``; the fitted model is a
    model directory like theirs (``model_dir_``).

    Two kinds of data, decided by the shape of ``X``:

    - vectors, ``(n_samples, n_features)`` for any number of features: the ``mlp`` backbone,
      features standardised or not (``preprocessing``);
    - images, ``(n_samples, H, W)`` (grayscale) or ``(n_samples, H, W, C)``, pixels in [0, 1]
      or integers 0-255: the backbone the config names.

    Parameters
    ----------
    contamination : float in (0., 0.5] or a PyThresh thresholder, optional (default=0.1)
        The expected share of outliers in the training data. As in every PyOD detector it sets
        ``threshold_``, the (1 - contamination) quantile of ``decision_scores_``; a thresholder
        (an object with ``fit(scores)`` setting ``labels_`` and ``thresh_``) sets them instead.
    config : Config, str or Path, optional (default=None)
        Model, training and scoring configuration, or a YAML file. None: the packaged
        ``vectors.yaml`` for vectors, ``mnist.yaml`` (conv backbone) for images of 28, 32 or
        64 pixels, ``mnist-mlp.yaml`` (MLP backbone) for images of other sizes.
    preprocessing : {'standardize', 'none'}, optional (default='standardize')
        Vectors only. ``'standardize'`` centres and scales each feature by the mean and
        standard deviation of the training data (a constant feature is only centred); the
        statistics are saved with the model and applied to every sample scored later.
        ``'none'`` models the features as they are (for data already on a common scale).
    epochs : int, optional (default=None)
        Overrides ``train.epochs`` of the config.
    random_state : int, optional (default=None)
        Seed of the validation split, the initialisation and the Langevin noise (default:
        ``train.seed`` of the config).
    val_fraction : float, optional (default=0.1)
        Share of ``X`` held out of training, on which the score's components are standardised
        (median and MAD) before they are combined.
    model_dir : str or Path, optional (default=None)
        Where the fitted model directory is written (default: a temporary directory that lives
        as long as the detector).
    device : str, optional (default='auto')
        ``'auto'``, ``'cpu'`` or ``'cuda'``.

    Attributes
    ----------
    decision_scores_ : numpy array of shape (n_samples,)
        The outlier scores of the training data. The higher, the more abnormal.
    threshold_ : float
        The (1 - contamination) quantile of ``decision_scores_``; a score above it is an outlier.
    labels_ : numpy array of shape (n_samples,)
        0 (inlier) or 1 (outlier) for each training sample.
    data_kind_ : str
        ``'vector'`` or ``'image'``.
    data_shape_ : tuple of int
        The shape of one sample, ``(n_features,)``, ``(H, W)`` or ``(H, W, C)``.
    model_dir_ : Path
        The fitted model directory (config, weights, standardisation, calibration).
    stopped_early_ : str
        Empty, or why the breakdown guard (``train.max_recon_rise``) stopped training and which epoch it kept;
        ``fit`` then also warns with a ``ConvergenceWarning``.

    Examples
    --------
    >>> from outlier_jebm.detector import JEBMDetector
    >>> det = JEBMDetector(contamination=0.05).fit(X_train)   # doctest: +SKIP
    >>> det.decision_function(X_test)                          # doctest: +SKIP
    """

    def __init__(
        self,
        contamination=0.1,
        config=None,
        preprocessing="standardize",
        epochs=None,
        random_state=None,
        val_fraction=0.1,
        model_dir=None,
        device="auto",
    ):
        super().__init__(contamination=contamination)
        self.config = config
        self.preprocessing = preprocessing
        self.epochs = epochs
        self.random_state = random_state
        self.val_fraction = val_fraction
        self.model_dir = model_dir
        self.device = device

    def fit(self, X, y=None):
        """Fit the detector on X; y is ignored (unsupervised).

        Parameters
        ----------
        X : numpy array of shape (n_samples, n_features), (n_samples, H, W) or (n_samples, H, W, C)
            Training data: vectors, or images in [0, 1] or 0-255.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            The fitted detector.
        """
        from .checkpoint import load_model
        from .pipeline import TrainingData, run_fit
        from .scoring import Scorer
        from .train import resolve_device

        if _is_number(self.contamination):
            if not 0.0 < self.contamination <= 0.5:
                raise ValueError(f"contamination must be in (0, 0.5], got {self.contamination}")
        elif not callable(getattr(self.contamination, "fit", None)):
            raise ValueError(
                f"contamination must be a number in (0, 0.5] or a PyThresh thresholder, got {self.contamination!r}"
            )
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {self.preprocessing!r}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        self._set_n_classes(y)
        for stale in ("feature_names_in_", "n_features_in_"):  # a refit records its own data's, as scikit-learn does
            self.__dict__.pop(stale, None)
        names = _column_names(X)
        X = _as_array(X)
        cfg = self._config_for(X)
        data = self._validated(X, cfg)
        if len(data) < 10:
            raise ValueError(f"X: {len(data)} samples are too few to fit and calibrate a detector (at least 10)")
        order = np.random.default_rng(cfg.train.seed).permutation(len(data))
        n_val = max(5, int(round(self.val_fraction * len(data))))
        td = TrainingData(
            train=data[order[n_val:]],
            val=data[order[:n_val]],
            name="JEBMDetector.fit",
            holdout=None,
            feature_names=names if X.ndim == 2 else None,
        )
        if self.model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jebm-detector-")
            out = Path(self._tmp.name)
        else:
            out = Path(self.model_dir)
        device = resolve_device(self.device)
        summary = run_fit(cfg, td, out_dir=out, device=self.device, track=False, remember=False)
        self.stopped_early_ = summary.stopped
        if summary.stopped:
            warnings.warn(f"JEBMDetector.fit: {summary.stopped}", ConvergenceWarning, stacklevel=2)
        self._scorer = Scorer(load_model(out, device=device), device=device)
        self.model_dir_ = out
        self.config_ = self._scorer.config
        self.data_kind_ = cfg.model.data_kind
        self.data_shape_ = tuple(cfg.model.data_shape)
        if X.ndim == 2:  # scikit-learn's record of the features (their names only where X had string column names)
            self.n_features_in_ = int(X.shape[1])
            if names is not None:
                self.feature_names_in_ = np.asarray(names, dtype=object)
        self.decision_scores_ = self._scorer.score(data)["score"]
        self._process_decision_scores()
        return self

    def decision_function(self, X):
        """Outlier scores of X with the fitted detector (higher = more abnormal).

        Parameters
        ----------
        X : numpy array of shape (n_samples, n_features), (n_samples, H, W) or (n_samples, H, W, C)
            Data of the kind and shape the detector was fitted on.

        Returns
        -------
        anomaly_scores : numpy array of shape (n_samples,)
            The anomaly score of each sample.
        """
        check_is_fitted(self, ["decision_scores_", "threshold_", "labels_"])
        fitted_names = getattr(self, "feature_names_in_", None)
        given = _column_names(X)
        if fitted_names is not None and given is not None and given != list(fitted_names):
            # a DataFrame's columns are matched by name, as they were fitted, whatever their order
            missing = [c for c in fitted_names if c not in given]
            if missing:
                raise DataError(f"X: column(s) {', '.join(missing[:5])} missing; the detector was fitted on them")
            X = X[list(fitted_names)]
        return self._scorer.score(self._validated(_as_array(X), self.config_))["score"]

    def _config_for(self, X: np.ndarray) -> Config:
        """The config to fit X with: the data kind, the feature count or the image size from X itself."""
        if X.ndim == 2:
            cfg = self._base_config("vector")
            cfg = for_vectors(cfg, X.shape[1]).with_overrides(
                model={"standardize": self.preprocessing == "standardize"}
            )
        elif X.ndim in (3, 4) and X.shape[1] == X.shape[2]:
            channels = 1 if X.ndim == 3 else X.shape[3]
            if channels not in (1, 3):
                raise DataError(
                    f"X: images with {channels} channels; expected gray (H, W) or (H, W, 1), or RGB (H, W, 3)"
                )
            cfg = self._base_config("image", X.shape[1])
            cfg = cfg.with_overrides(model={"image_size": int(X.shape[1]), "channels": int(channels)})
        else:
            raise DataError(
                f"X: shape {X.shape} is neither vectors (n_samples, n_features) nor square images "
                "(n_samples, H, W) or (n_samples, H, W, C)"
            )
        return cfg.with_overrides(
            # a PyThresh thresholder sets labels_ itself; the model's calibration keeps the config's rate
            score={"false_alarm_rate": float(self.contamination) if _is_number(self.contamination) else None},
            train={"epochs": self.epochs, "seed": self.random_state},
        )

    def _base_config(self, kind: str, image_size: int | None = None) -> Config:
        if isinstance(self.config, Config):
            return self.config
        return Config.from_yaml(self.config if self.config is not None else default_config_path(kind, image_size))

    @staticmethod
    def _validated(X: np.ndarray, cfg: Config) -> np.ndarray:
        """X checked against the config's data kind and shape; images scaled to [0, 1]."""
        from .tables import check_vectors

        m = cfg.model
        if m.is_vector:
            if X.ndim != 2 and not (X.ndim == 1 and X.shape[0] == m.vector_dim):
                raise DataError(
                    f"X: shape {X.shape} is not (n_samples, n_features); this detector was fitted "
                    f"on vectors of {m.vector_dim} features"
                )
            return check_vectors(X, "X", dim=m.vector_dim)
        if X.ndim == 2:
            raise DataError(
                f"X: shape {X.shape} looks like vectors, but this detector was fitted on images of "
                f"shape {tuple(m.data_shape)}"
            )
        if X.ndim == 4 and X.shape[3] == 1 and m.channels == 1:  # (n, H, W, 1), as Keras keeps gray images
            X = X[..., 0]
        if tuple(X.shape[1:]) != tuple(m.data_shape):
            raise DataError(
                f"X: images of shape {tuple(X.shape[1:])}, but this detector was fitted on {tuple(m.data_shape)}"
            )
        if m.channels == 1:
            return to_unit_range(X, m.image_size, name="X")
        return to_unit_range(X, m.image_size, name="X", channels=m.channels)


def _column_names(X) -> list[str] | None:
    """A DataFrame's column names when every one is a string (as scikit-learn records them), else None."""
    columns = getattr(X, "columns", None)
    if columns is None or not all(isinstance(c, str) for c in columns):
        return None
    return list(columns)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _as_array(X) -> np.ndarray:
    """A DataFrame's numbers as floats (nullable Int64 / Float64 and booleans too, a missing value as NaN), a column
    that is not numeric named; anything else as ``np.asarray`` gives it."""
    if not hasattr(X, "columns") or not hasattr(X, "to_numpy"):
        return np.asarray(X)
    from .tables import numeric_frame

    return numeric_frame(X, "X")
