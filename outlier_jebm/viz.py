"""Image grids for people: prior samples, reconstructions, anomaly maps.

Grayscale images (N, H, W) give grayscale pictures; RGB images (N, H, W, 3) give RGB ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .data import luminance


def image_grid(images: np.ndarray, ncol: int, *, scale: int = 3, pad: int = 1) -> Image.Image:
    """Tile images (N, H, W) or (N, H, W, 3) in [0, 1] into one PIL image ("L" or "RGB"), row by row."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    n, h, w = images.shape[:3]
    nrow = max(1, -(-n // ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, *images.shape[3:]), 0.5, dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    out = Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L" if images.ndim == 3 else "RGB")
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def stack_rows(grids: list[Image.Image], gap: int = 6) -> Image.Image:
    """Put several grids one above the other (e.g. short-run over long-run samples); RGB if any grid is."""
    mode = "RGB" if any(g.mode == "RGB" for g in grids) else "L"
    width = max(g.width for g in grids)
    height = sum(g.height for g in grids) + gap * (len(grids) - 1)
    out = Image.new(mode, (width, height), 255 if mode == "L" else (255, 255, 255))
    y = 0
    for g in grids:
        out.paste(g.convert(mode), (0, y))
        y += g.height + gap
    return out


def anomaly_overlay(
    image01: np.ndarray, error: np.ndarray, *, scale: int = 6, vmax: float | None = None
) -> Image.Image:
    """The input (left) beside a gray copy of it with its per-pixel error as a red heat overlay (right).

    ``image01`` and ``error`` are (H, W), or (H, W, 3) for RGB: then the input is shown in colour
    and the heat is the error summed over channels, over a dimmed luminance copy (red on red
    would not read).
    """
    img = np.clip(np.asarray(image01, dtype=np.float32), 0, 1)
    heat = np.asarray(error, dtype=np.float32)
    if heat.ndim == 3:
        heat = heat.sum(-1)
    heat = np.clip(heat / (vmax if vmax else max(float(heat.max()), 1e-6)), 0, 1)
    shown = img if img.ndim == 3 else np.stack([img] * 3, axis=-1)
    base = luminance(img) if img.ndim == 3 else img
    gray = np.stack([base] * 3, axis=-1) * 0.6
    over = gray.copy()
    over[..., 0] = np.clip(gray[..., 0] + heat, 0, 1)
    over[..., 1] = gray[..., 1] * (1 - heat)
    over[..., 2] = gray[..., 2] * (1 - heat)
    pair = np.concatenate([shown, np.ones((img.shape[0], 1, 3)), over], axis=1)
    out = Image.fromarray((pair * 255).round().astype(np.uint8), mode="RGB")
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)
