"""Image decoding and image stacks: every image jebm-od reads becomes float32 in [0, 1].

Grayscale (``channels=1``) images are ``(H, W)`` and stacks ``(N, H, W)``; image files keep their
polarity unless read with ``polarity="auto"``, which inverts dark-on-light images to MNIST's
white strokes on black. Colour (``channels=3``) is ``(H, W, 3)`` / ``(N, H, W, 3)``, RGB, channel
last, never inverted. A grayscale reader turns colour into luminance; a colour reader repeats
a gray image's channel. The model rescales to [-1, 1] itself.

User files are never unpickled: every ``np.load`` passes ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .geometry import border, cap_long_side, pad_square, resize

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

CHANNELS = (1, 3)

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


# An image file larger than this is refused before it is read: a 16-bit RGB image at Pillow's pixel limit, stored
# uncompressed, is about 540 MB.
MAX_FILE_BYTES = 1 << 30


def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """Every file under ``folder``, following linked folders (each real folder once, so a link loop ends), sorted;
    and the links that point at nothing."""
    files, broken, seen = [], [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in names:
            path = Path(root) / name
            (files if path.is_file() else broken if path.is_symlink() and not path.exists() else []).append(path)
    return sorted(files), sorted(broken)


def non_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files inside the given folders that ``image_files`` passes over (not images by suffix), sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            out.extend(p for p in _walk(path)[0] if p.suffix.lower() not in IMAGE_SUFFIXES)
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
        Paths that do not exist, folders with no image file in them, links in
        them that point at nothing, and files given explicitly that are not
        images by suffix, each with the reason. Linked folders are followed.
        Other files inside folders are ignored, as a folder may hold notes or
        labels beside its images.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            everything, broken = _walk(path)
            found = [p for p in everything if p.suffix.lower() in IMAGE_SUFFIXES]
            problems.extend((p, "a link to a file that does not exist") for p in broken)
            if not found:
                problems.append((path, f"a folder with no image files in it ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            files.extend(found)
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
    return bool(border(pixels).mean() > 0.5)


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
        st = os.stat(path)
        # a device (/dev/zero), a FIFO or a socket is not an image file: opening or reading one may never end
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(path, f"file of {st.st_size} bytes is over the limit of {MAX_FILE_BYTES} bytes")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ImageError(path, f"cannot read file ({err.strerror or err})") from err
    if len(data) > MAX_FILE_BYTES:  # it grew while read
        raise ImageError(path, f"file is over the limit of {MAX_FILE_BYTES} bytes")
    return decode_image(data, image_size, str(path), channels, polarity)


def decode_image(
    data: bytes, image_size: int = 28, name: str = "<bytes>", channels: int = 1, polarity: str = "keep"
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) exactly as ``read_image`` does.

    Grayscale of any bit depth is scaled by its full range; transparency is
    composited over black; an EXIF orientation is applied; the image is padded
    to a square with its border colour and resized (one with a long side over
    ``MAX_LONG_SIDE`` first shrinks to it, keeping its aspect ratio). With ``channels=1`` colour becomes luminance; with
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
        # a camera's photo stored sideways with an EXIF orientation tag is read upright, as viewers show it
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except (SyntaxError, ValueError, OSError, TypeError, KeyError):
            pass  # a malformed EXIF block: its orientation cannot be read, the pixels are read as stored
        pixels = _to_gray(img, name) if channels == 1 else _to_rgb(img, name)
    if pixels.size == 0:
        raise ImageError(name, "image has no pixels")
    pixels = resize(pad_square(cap_long_side(pixels)), image_size)
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
