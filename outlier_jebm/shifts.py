"""Whole-pixel moves of images in model space (flat (B, D) rows in H, W, C order), the edges repeated into the gap.

``shifted_copies`` gives the four moves that ``score.shifts`` scores; ``random_shifts`` moves each training image
by its own random offset (``train.shifts``).
"""

from __future__ import annotations

import torch
from torch.nn import functional


def _padded(x: torch.Tensor, shape: tuple[int, ...], pixels: int) -> torch.Tensor:
    """(B, C, H + 2p, W + 2p): row r of the result is row r - p of the image, the edge rows and columns repeated."""
    p = pixels
    img = x.view(x.shape[0], shape[0], shape[1], -1).permute(0, 3, 1, 2)  # (B, C, H, W)
    return functional.pad(img, (p, p, p, p), mode="replicate")


def shifted_copies(x: torch.Tensor, shape: tuple[int, ...], pixels: int) -> torch.Tensor:
    """Images (B, D) in model space moved by ``pixels`` down, up, right and left, the edge rows and columns
    repeated into the gap: (4 B, D), one move after the other."""
    h, w, p = shape[0], shape[1], pixels
    padded = _padded(x, shape, p)
    moves = (
        padded[..., :h, p : p + w],
        padded[..., 2 * p :, p : p + w],
        padded[..., p : p + h, :w],
        padded[..., p : p + h, 2 * p :],
    )
    return torch.cat([m.permute(0, 2, 3, 1).reshape(x.shape[0], -1) for m in moves])


def random_shifts(x: torch.Tensor, shape: tuple[int, ...], pixels: int) -> torch.Tensor:
    """Each image of (B, D) moved by its own offset (dy, dx), each drawn uniformly from -pixels..pixels (torch's
    global generator; the unmoved image and the diagonals included), the edges repeated: (B, D)."""
    h, w, p, b = shape[0], shape[1], pixels, x.shape[0]
    padded = _padded(x, shape, p)
    dy, dx = torch.randint(0, 2 * p + 1, (2, b, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device)  # (B, H): the padded rows each output row reads
    cols = dx + torch.arange(w, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices around the channel slice put their dimensions first: (B, H, W, C), the flat H, W, C order
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].reshape(b, -1)
