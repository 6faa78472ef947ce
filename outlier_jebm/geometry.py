"""Resizing float images: one step to a square, padding to a square with the background, and the long-side cap.

Every image jebm-od reads ends here as float32 in [0, 1]: ``(H, W)`` gray or ``(H, W, C)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_stack(images: np.ndarray, image_size: int) -> np.ndarray:
    """Each image of a stack ``(N, H, W[, C])`` resized to ``(image_size, image_size)``, as ``resize`` does."""
    out = np.empty((len(images), image_size, image_size, *images.shape[3:]), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = resize(img.astype(np.float32, copy=False), image_size)
    return out


def resize(img: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a float32 image: Lanczos when shrinking (sharp, antialiased), bilinear when enlarging (no ringing)."""
    return resize_to(img, image_size, image_size)


def resize_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``resize`` to any ``(height, width)``."""
    if img.shape[:2] == (height, width):
        return img
    if img.ndim == 3:  # (H, W, C): Pillow resizes float images only in mode F, one channel at a time
        return np.stack([resize_to(img[..., c], height, width) for c in range(img.shape[2])], axis=-1)
    shrinking = img.shape[0] > height or img.shape[1] > width
    method = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(img).resize((width, height), method), dtype=np.float32)
    # Lanczos overshoots a little around sharp strokes.
    return np.clip(resized, 0.0, 1.0)


# The padded square of a long, thin image would be (long side)^2 pixels: 30000 x 300 becomes 3.6 GB of float32.
# Past this long side the image first shrinks, its aspect ratio kept; anything at or under it is resized in one step.
MAX_LONG_SIDE = 4096


def cap_long_side(img: np.ndarray) -> np.ndarray:
    """The image itself if its long side is at most ``MAX_LONG_SIDE``, else shrunk to it with its aspect ratio."""
    height, width = img.shape[:2]
    long = max(height, width)
    if long <= MAX_LONG_SIDE:
        return img
    scale = MAX_LONG_SIDE / long
    return resize_to(img, max(1, round(height * scale)), max(1, round(width * scale)))


def border(img: np.ndarray) -> np.ndarray:
    """The outer ring of pixels (two wide, one for tiny images): (n,), or (n, C) for (H, W, C)."""
    width = 1 if min(img.shape[:2]) < 12 else 2
    mask = np.ones(img.shape[:2], dtype=bool)
    mask[width:-width, width:-width] = False
    return img[mask]


def pad_square(img: np.ndarray) -> np.ndarray:
    """Pad the short side with the background so a resize keeps the aspect ratio.

    The border's median stands for the background: unlike its mean it ignores
    a stroke that touches the edge.
    """
    height, width = img.shape[:2]
    if height == width:
        return img
    side = max(height, width)
    out = np.full((side, side, *img.shape[2:]), np.median(border(img), axis=0), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = img
    return out
