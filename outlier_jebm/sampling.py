"""Pictures of the prior, as in the papers' figures: is the learned prior healthy?"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .langevin import prior_langevin
from .model import JointEBM
from .viz import image_grid, stack_rows


def to_images(model: JointEBM, z: torch.Tensor) -> np.ndarray:
    """Decode latents to images (N, H, W[, C]) in [0, 1]."""
    with torch.no_grad():
        return model.from_model_space(model.generator.mean_x(z))


def prior_samples(model: JointEBM, n: int, *, steps: int, step_size: float) -> np.ndarray:
    z, _ = prior_langevin(model, n, steps=steps, step_size=step_size)
    return to_images(model, z)


def hierarchical_samples(model: JointEBM, ncol: int, *, steps: int, step_size: float) -> np.ndarray:
    """Row k resamples layer k only (reference noise and Langevin on that layer), the others held fixed.

    Returns images (L * ncol, H, W[, C]): what each layer controls, bottom layer first.
    """
    device = next(model.parameters()).device
    dims = model.cfg.z_dims
    base = torch.randn(1, model.z_dim, device=device)
    base_z, _ = prior_langevin(model, 1, steps=steps, step_size=step_size, init_eps=base)
    base_eps = model.generator.to_eps(base_z).detach()
    rows = []
    offset = 0
    for d in dims:
        mask = torch.zeros(1, model.z_dim, device=device)
        mask[:, offset : offset + d] = 1.0
        eps = base_eps.repeat(ncol, 1)
        eps[:, offset : offset + d] = torch.randn(ncol, d, device=device)
        z, _ = prior_langevin(model, ncol, steps=steps, step_size=step_size, init_eps=eps, mask=mask)
        rows.append(to_images(model, z))
        offset += d
    return np.concatenate(rows, axis=0)


def sample_figures(
    model: JointEBM, *, steps: int, step_size: float, n: int = 64, long_factor: int = 10
) -> dict[str, Image.Image]:
    """PNG-ready grids: prior samples, hierarchical sampling, short-run vs long-run chains (RGB for a colour model)."""
    was_training = model.training
    model.eval()
    ncol = 8
    figures = {
        "prior_samples": image_grid(prior_samples(model, n, steps=steps, step_size=step_size), ncol),
        "hierarchical_samples": image_grid(hierarchical_samples(model, ncol, steps=steps, step_size=step_size), ncol),
    }
    device = next(model.parameters()).device
    eps = torch.randn(ncol, model.z_dim, device=device)
    short, _ = prior_langevin(model, ncol, steps=steps, step_size=step_size, init_eps=eps)
    long, _ = prior_langevin(model, ncol, steps=steps * long_factor, step_size=step_size, init_eps=eps)
    figures["short_vs_long_run"] = stack_rows(
        [image_grid(to_images(model, short), ncol), image_grid(to_images(model, long), ncol)]
    )
    model.train(was_training)
    return figures


def reconstructions(model: JointEBM, images01: np.ndarray) -> Image.Image:
    """Inputs (N, H, W[, C]) in [0, 1] (top row) over their reconstructions from the inference network's mean
    (bottom row)."""
    device = next(model.parameters()).device
    x = model.to_model_space(images01, device)
    with torch.no_grad():
        z, _ = model.encoder(x, sample=False)
    recon = to_images(model, z)
    shape = model.cfg.data_shape
    return stack_rows([image_grid(images01.reshape(-1, *shape), len(images01)), image_grid(recon, len(images01))])
