"""Plain feature vectors: tables from files, and the real vector data sets that ship offline.

A vector data set is a float array ``(N, d)`` with optional class labels. Nothing here
scales the features: the model standardises them itself (``model.standardize``) with
statistics of its training data, and the benchmark gives every detector the same input.

Named sets (all real, all offline; ``holdout`` is the class treated as anomalous):

- ``breast_cancer``: scikit-learn's Wisconsin diagnostic breast cancer, 30 features; benign
  (class 1) is normal, malignant (class 0) the anomaly class, of which a subsample of
  ``BREAST_CANCER_ANOMALIES`` enters the test part, as in the ODDS "WBC" set (357 benign,
  21 malignant).
- ``wine``: scikit-learn's wine, 13 features, 3 classes.
- ``digits64``: scikit-learn's 8 x 8 digits as 64 features (0-16 counts).
- ``mnist784``: all 70 000 MNIST images as 784 features in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DataError

TABLE_SUFFIXES = (".csv", ".parquet", ".npy", ".npz")
BREAST_CANCER_ANOMALIES = 21
VECTOR_DATASETS = ("breast_cancer", "wine", "digits64", "mnist784")


@dataclass
class VectorDataset:
    """Feature vectors with optional class labels.

    Attributes
    ----------
    features : np.ndarray
        float32 ``(N, d)``, finite.
    labels : np.ndarray or None
        int64 ``(N,)``, or None for unlabelled tables.
    name : str
        Where the data came from.
    columns : list of str
        Feature names (``x0``, ``x1``, ... where the source has none).
    max_anomalies : int or None
        For the hold-out protocol: at most this many anomalies in a test part (None: all).
    """

    features: np.ndarray
    labels: np.ndarray | None
    name: str
    columns: list[str]
    max_anomalies: int | None = None

    def __len__(self) -> int:
        return len(self.features)

    @property
    def images(self) -> np.ndarray:
        """The features, under the name the hold-out split and the pipeline read."""
        return self.features


def is_vector_source(source: str) -> bool:
    """True for a named vector data set or a table file (.csv or .parquet; .npy/.npz of 2-d arrays
    are decided by their shape, see ``cli`` and ``load_table``)."""
    key = str(source).strip().lower()
    return key in VECTOR_DATASETS or Path(key).suffix in (".csv", ".parquet")


def load_vector_dataset(source: str, data_dir: str | Path | None = None) -> VectorDataset:
    """A named vector data set (``VECTOR_DATASETS``) or a table file.

    Raises
    ------
    DataError
        If the source is missing or not a table of finite numbers.
    """
    key = str(source).strip().lower()
    if key == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        b = load_breast_cancer()
        # sklearn's target is 0 = malignant, 1 = benign: malignant is the anomaly class (hold out 0)
        return VectorDataset(
            b.data.astype(np.float32),
            b.target.astype(np.int64),
            "breast_cancer",
            [str(c) for c in b.feature_names],
            max_anomalies=BREAST_CANCER_ANOMALIES,
        )
    if key == "wine":
        from sklearn.datasets import load_wine

        b = load_wine()
        return VectorDataset(
            b.data.astype(np.float32), b.target.astype(np.int64), "wine", [str(c) for c in b.feature_names]
        )
    if key == "digits64":
        from sklearn.datasets import load_digits

        b = load_digits()
        return VectorDataset(
            b.data.astype(np.float32),
            b.target.astype(np.int64),
            "digits64",
            [f"pixel{i}" for i in range(b.data.shape[1])],
        )
    if key == "mnist784":
        from .data import load_mnist

        ds = load_mnist(data_dir)
        flat = ds.images.reshape(len(ds.images), -1)
        return VectorDataset(flat, ds.labels, "mnist784", [f"pixel{i}" for i in range(flat.shape[1])])
    features, columns = load_table(source)
    return VectorDataset(features, None, Path(source).name, columns)


def feature_names_of(ds: VectorDataset) -> list[str] | None:
    """The data set's column names, or None where it had none (an array's ``x0``, ``x1``, ... stand-ins)."""
    if ds.columns == [f"x{i}" for i in range(ds.features.shape[1])]:
        return None
    return list(ds.columns)


def load_table(
    path: str | Path, *, allow_nonfinite: bool = False, columns: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Read a table of numbers: ``.csv`` (a header row), ``.parquet``, or a 2-d ``.npy`` / ``.npz``.

    Every column must be numeric and (unless ``allow_nonfinite``, for scoring, where a bad row
    is reported on its own) every value finite; the error names the file and the column (or
    row) at fault. ``columns`` (the feature names a model was fitted on) picks those columns of a
    ``.csv`` / ``.parquet`` table by name, in that order, whatever else the table holds (an index
    column, an id); one of them missing is an error that names it, unless the table has none of
    them and exactly as many columns (another header, such as pandas' 0, 1, ...): then by position. Arrays have no names: they
    are read as they are.

    Returns
    -------
    features : np.ndarray
        float32 ``(N, d)``.
    columns : list of str
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        except Exception as exc:  # pandas raises many kinds; the message says which file and why
            raise DataError(f"{path}: not a readable {suffix[1:]} table ({type(exc).__name__}: {exc})") from None
        if columns is not None:
            frame.columns = [str(c) for c in frame.columns]
            missing = [c for c in columns if c not in frame.columns]
            if len(missing) == len(columns) and frame.shape[1] == len(columns):
                missing, columns = [], list(frame.columns)  # none of the names, the same width: read by position
            if missing:
                raise DataError(
                    f"{path}: column(s) {', '.join(missing[:5])} missing; the model was fitted on the columns "
                    f"{', '.join(columns[:8])}{' ...' if len(columns) > 8 else ''}"
                )
            frame = frame[columns]
        columns = [str(c) for c in frame.columns]
        features = numeric_frame(frame, str(path))
    elif suffix in (".npy", ".npz"):
        from .data import _load_array_file

        features, _ = _load_array_file(path)
        columns = []
    else:
        raise DataError(f"{path}: unsupported table type {suffix or '(none)'}; expected {', '.join(TABLE_SUFFIXES)}")
    features = check_vectors(features, str(path), allow_nonfinite=allow_nonfinite)
    return features, columns or [f"x{i}" for i in range(features.shape[1])]


def numeric_frame(frame, name: str) -> np.ndarray:
    """A DataFrame's numbers as float64 ``(N, d)``: nullable Int64 / Float64 and booleans too, a missing value as NaN
    (the checks after it report those by row); a column that is not numeric is a DataError naming it."""
    from pandas.api.types import is_numeric_dtype

    bad = [str(c) for c in frame.columns if not is_numeric_dtype(frame[c])]
    if bad:
        raise DataError(f"{name}: column(s) {', '.join(bad[:5])} are not numeric; vectors need numbers only")
    return frame.to_numpy(dtype=np.float64, na_value=np.nan)


def check_vectors(X, name: str = "X", dim: int | None = None, *, allow_nonfinite: bool = False) -> np.ndarray:
    """Validate vectors handed in by a user: ``(N, d)`` (or one ``(d,)``) of finite numbers.

    Parameters
    ----------
    X : array_like
    name : str
        Names the input in error messages.
    dim : int, optional
        The number of features a fitted model expects.

    Returns
    -------
    np.ndarray
        float32 ``(N, d)``.
    """
    array = np.asarray(X)
    if array.ndim == 1 and dim is not None:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise DataError(f"{name}: vectors must be a 2-d array (n_samples, n_features), got shape {array.shape}")
    if len(array) == 0 or array.shape[1] == 0:
        raise DataError(f"{name}: no data (shape {array.shape})")
    if dim is not None and array.shape[1] != dim:
        raise DataError(f"{name}: {array.shape[1]} features, but the model was fitted on {dim}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{name}: features must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any() and not allow_nonfinite:
        row, col = map(int, np.argwhere(bad)[0])
        raise DataError(
            f"{name}: {int(bad.any(1).sum())} row(s) hold NaN or infinite values (first: row {row}, feature {col})"
        )
    return array


def vector_holdout_split(ds: VectorDataset, holdout: int, seed: int = 0, val_fraction: float = 0.05):
    """The hold-out split of ``data.holdout_split`` on vectors, with at most ``ds.max_anomalies``
    anomalies (drawn with ``seed``) in the test part."""
    from .data import holdout_split

    split = holdout_split(ds, holdout, seed=seed, val_fraction=val_fraction)  # type: ignore[arg-type]
    if ds.max_anomalies is None or int(split.test_is_anomaly.sum()) <= ds.max_anomalies:
        return split
    anomalies = np.flatnonzero(split.test_is_anomaly)
    drop = np.random.default_rng([seed, 1]).permutation(anomalies)[ds.max_anomalies :]
    keep = np.setdiff1d(np.arange(len(split.test)), drop)
    split.test, split.test_is_anomaly, split.test_labels = (
        split.test[keep],
        split.test_is_anomaly[keep],
        split.test_labels[keep],
    )
    return split
