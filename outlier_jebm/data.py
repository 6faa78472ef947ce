"""Datasets by name or path, and the hold-out-one-digit split.

Sources:

* ``"mnist"``: see ``outlier_jebm.mnist`` (offline first, checksummed).
* ``"digits"``: scikit-learn's bundled 8x8 digits.
* a ``.npy`` / ``.npz`` file, or a folder of image files (recursive).

Images come back as ``outlier_jebm.images`` makes them: float32 in [0, 1], ``(N, H, W)`` or
``(N, H, W, 3)``. User files are never unpickled: every ``np.load`` passes ``allow_pickle=False``.
Image decoding and MNIST acquisition live in their own modules; their public names are
re-exported here, where callers have always found them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import resize_stack
from .images import (  # noqa: F401  (re-exported: the data API)
    CHANNELS,
    IMAGE_SUFFIXES,
    LUMA_WEIGHTS,
    POLARITIES,
    DataError,
    Dataset,
    ImageError,
    _check_channels,
    _check_image_size,
    _load_npz,
    _to_square_stack,
    check_polarity,
    decode_image,
    describe_shapes,
    image_files,
    image_stack,
    light_background,
    luminance,
    match_channels,
    non_image_files,
    one_image_shapes,
    read_image,
    to_unit_range,
)
from .mnist import DEFAULT_DATA_DIR, load_mnist  # noqa: F401  (re-exported: the data API)


@dataclass
class Split:
    """The hold-out-one-digit split: one digit is the anomaly class, the others are normal.

    Attributes
    ----------
    train : np.ndarray
        float32 ``(n_train, H, W)``, normal images only.
    val : np.ndarray
        Normal images carved from the end of the training part (never from the
        test part), for calibration and early stopping.
    test : np.ndarray
        The remaining normals followed by every image of the held-out digit.
    test_is_anomaly : np.ndarray
        int64 ``(n_test,)``, 1 where the image is of the held-out digit.
    test_labels : np.ndarray
        int64 ``(n_test,)``, the original digit labels of ``test``.
    holdout : int
        The held-out (anomalous) digit.
    seed : int
        The seed of the shuffle of the normal images.
    train_labels : np.ndarray or None
        int64 ``(n_train,)``, the digit labels of ``train`` (for the sample-quality classifier).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_is_anomaly: np.ndarray
    test_labels: np.ndarray
    holdout: int
    seed: int
    train_labels: np.ndarray | None = None


def load_dataset(
    source: str, data_dir: str | Path | None = None, image_size: int = 28, channels: int = 1, polarity: str = "keep"
) -> Dataset:
    """Load a dataset by name or path.

    Parameters
    ----------
    source : str
        ``"mnist"``, ``"digits"``, a ``.npy`` / ``.npz`` file (``(N, H, H)``,
        ``(N, H*H)`` or colour ``(N, H, H, 3)``; uint8 0-255 or floats in [0, 1]),
        a folder of images (searched recursively) or a single image file. The two
        names win over a folder of the same name; write ``./mnist`` for the folder.
    data_dir : str or Path, optional
        Where MNIST files are looked for and cached (see ``load_mnist``).
    image_size : int
        Side of the returned square images; sources of another size are resized.
    channels : int
        1: grayscale images ``(N, S, S)`` (colour sources become luminance);
        3: RGB images ``(N, S, S, 3)`` (gray sources repeat their channel).
    polarity : {"keep", "auto"}
        For image files: ``"auto"`` inverts gray dark-on-light images (``decode_image``).

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the source is missing, empty, malformed, or any image in a folder
        is unusable (training data should be clean, so nothing is skipped).
    """
    _check_image_size(image_size)
    _check_channels(channels)
    key = str(source).strip().lower()
    if key == "mnist":
        ds = load_mnist(data_dir)
        if image_size != ds.images.shape[-1]:
            ds = Dataset(resize_stack(ds.images, image_size), ds.labels, ds.name)
        return Dataset(match_channels(ds.images, channels), ds.labels, ds.name) if channels != 1 else ds
    if key == "digits":
        ds = load_digits(image_size)
        return Dataset(match_channels(ds.images, channels), ds.labels, ds.name) if channels != 1 else ds

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist (expected 'mnist', 'digits', a .npy/.npz file or a folder of images)")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".npy", ".npz"):
        images, labels = _load_array_file(path)
        images = _to_square_stack(images, str(path))
        if images.shape[1] != image_size:
            images = resize_stack(images, image_size)
        return Dataset(match_channels(images, channels), labels, path.name)
    if path.is_file() and suffix not in IMAGE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}; expected .npy, .npz, "
            f"an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a folder"
        )
    return _load_image_folder(path, image_size, channels, check_polarity(polarity))


def _load_image_folder(path: Path, image_size: int, channels: int = 1, polarity: str = "keep") -> Dataset:
    files, problems = image_files([path])
    if not files:
        raise DataError(f"no images found in {path} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    images = []
    for file in files:
        try:
            images.append(read_image(file, image_size, channels, polarity))
        except ImageError as err:
            problems.append((Path(err.path), err.reason))
    if problems:
        shown = "; ".join(f"{p}: {reason}" for p, reason in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(
            f"{len(problems)} of {len(files)} files in {path} are unusable as training images: {shown}{more}"
        )
    return Dataset(np.stack(images).astype(np.float32, copy=False), None, path.name)


IMAGE_DATASETS = ("mnist", "digits")  # the image data sets known by name (the rest are paths)


def is_named_source(source: str) -> bool:
    """True for a data set known by name (``IMAGE_DATASETS``, ``tables.VECTOR_DATASETS``), which loads the same
    anywhere; false for a file or folder, which a model records by its name alone."""
    from .tables import VECTOR_DATASETS

    return str(source).strip().lower() in IMAGE_DATASETS + VECTOR_DATASETS


def load_digits(image_size: int = 8) -> Dataset:
    """Scikit-learn's bundled 8x8 digits (1 797 images), scaled from 0-16 to [0, 1].

    Parameters
    ----------
    image_size : int
        Side of the returned images; other than 8 means a bilinear resize.

    Returns
    -------
    Dataset
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_image_size(image_size)
    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    if image_size != images.shape[-1]:
        images = resize_stack(images, image_size)
    return Dataset(images, np.asarray(bunch.target, dtype=np.int64), "digits")


def _load_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (as stored) and optional labels from a ``.npy`` or ``.npz`` file."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except ValueError as err:
            raise DataError(f"{path}: holds a pickled object array or is not a .npy file ({err})") from err
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: not a readable .npy file ({err})") from err

    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files
    except ValueError as err:
        raise DataError(f"{path}: not a .npz file ({err})") from err
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    image_key = next((k for k in ("images", "x") if k in names), None)
    if image_key is None:
        raise DataError(f"{path}: no array named 'images' or 'x' (has {names})")
    label_key = next((k for k in ("labels", "y") if k in names), None)
    arrays = _load_npz(path, [image_key] + ([label_key] if label_key else []))
    images = arrays[image_key]
    labels = None
    if label_key:
        labels = arrays[label_key]
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{path}: '{label_key}' must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    return images, labels


def holdout_split(
    ds: Dataset,
    holdout: int,
    seed: int = 0,
    train_fraction: float = 0.8,
    val_fraction: float = 0.05,
) -> Split:
    """Hold one digit out as the anomaly class (the MNIST protocol of the papers, on a clean split).

    The normal images are shuffled with ``np.random.default_rng(seed)``; the
    first ``train_fraction`` of them is the training part, whose last
    ``val_fraction`` share becomes ``val``; the rest of the normals plus every
    image of ``holdout`` form ``test``. A pure function of its arguments.

    Parameters
    ----------
    ds : Dataset
        A labelled dataset.
    holdout : int
        The digit treated as anomalous; must occur in ``ds.labels``.
    seed : int
        Seed of the shuffle.
    train_fraction : float
        Share of the normal images in the training part, in (0, 1).
    val_fraction : float
        Share of the training part kept for validation, in [0, 1).

    Returns
    -------
    Split

    Raises
    ------
    DataError
        If the dataset has no labels, ``holdout`` is not among them, or a
        fraction is out of range.
    """
    if ds.labels is None:
        raise DataError(f"dataset {ds.name!r} has no labels; the hold-out split needs digit labels")
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    labels = np.asarray(ds.labels)
    present = np.unique(labels)
    if holdout not in present:
        raise DataError(f"holdout digit {holdout} is not among the labels of {ds.name!r} ({present.tolist()})")

    normal = np.flatnonzero(labels != holdout)
    anomalous = np.flatnonzero(labels == holdout)
    shuffled = np.random.default_rng(seed).permutation(normal)
    n_part = int(train_fraction * len(shuffled))
    train_part, test_normal = shuffled[:n_part], shuffled[n_part:]
    n_val = int(round(val_fraction * n_part))
    train_idx, val_idx = train_part[: n_part - n_val], train_part[n_part - n_val :]
    if len(train_idx) == 0:
        raise DataError(f"dataset {ds.name!r} leaves no training images for holdout {holdout}")

    return split_by_index(ds, holdout, seed, train_idx, val_idx, np.concatenate([test_normal, anomalous]))


def split_by_index(
    ds: Dataset, holdout: int, seed: int, train_idx: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray
) -> Split:
    """The ``Split`` of ``ds`` that these indices (into ``ds``) choose; anomalies are the ``holdout`` class."""
    labels = np.asarray(ds.labels)
    return Split(
        train=ds.images[train_idx],
        val=ds.images[val_idx],
        test=ds.images[test_idx],
        test_is_anomaly=(labels[test_idx] == holdout).astype(np.int64),
        test_labels=labels[test_idx].astype(np.int64),
        holdout=int(holdout),
        seed=int(seed),
        train_labels=labels[train_idx].astype(np.int64),
    )
