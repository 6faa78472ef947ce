"""Short-run Langevin dynamics, the one sampler for prior and posterior.

    z <- z + (d^2 / 2) * grad log p(z) + d * eps,   eps ~ N(0, I)

with step size d (not the observation noise s of p(x | z)).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.utils import parametrize

from .model import JointEBM

LogDensity = Callable[[torch.Tensor], torch.Tensor]


def _spectral_norm_once_per_chain(model: JointEBM) -> contextlib.AbstractContextManager:
    """In eval mode, the EBM's spectral-norm weights computed once for a whole chain rather than at every step.

    Eval-mode weights do not change between steps, so the chain is bit-identical; it saves per-step overhead on
    small batches (``jebm-od sample --kind chains`` 0.91x) and nothing measurable on large ones (``--metrics``'
    10 000 samples 1.00x, benchmarks/RESULTS.md). In training mode each weight computation also runs a power
    iteration; caching would change how training goes (one iteration per chain instead of one per step: a step
    about 0.9x as long, benchmarks/RESULTS.md), which no benchmark of the default has validated, so training keeps
    the per-step weights.
    """
    return contextlib.nullcontext() if model.training else parametrize.cached()


@dataclass
class ChainTrace:
    """Mean log-density of the batch before each step and at the end: (steps + 1,)."""

    log_density: torch.Tensor


def langevin(
    log_density: LogDensity,
    init: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: bool = True,
    mask: torch.Tensor | None = None,
    trace: bool = False,
) -> tuple[torch.Tensor, ChainTrace | None]:
    """Run ``steps`` Langevin steps on ``log_density`` (a function (B, d) -> (B,)) from ``init``.

    Only the chain state gets gradients: parameters of the model behind
    ``log_density`` are left untouched. ``mask`` (broadcastable to init, 1 = moves)
    freezes coordinates, e.g. to resample one latent layer and keep the others.
    """
    z = init.detach().clone()
    half_d2 = 0.5 * step_size * step_size
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            z.requires_grad_(True)
            logp = log_density(z)
            (grad,) = torch.autograd.grad(logp.sum(), z)
            if trace:
                history.append(logp.detach().mean())
            move = half_d2 * grad
            if noise:
                move = move + step_size * torch.randn_like(z)
            if mask is not None:
                move = move * mask
            z = z.detach() + move
    if trace:
        with torch.no_grad():
            history.append(log_density(z).mean())
        return z, ChainTrace(torch.stack(history).cpu())
    return z, None


def prior_langevin(
    model: JointEBM,
    n: int,
    *,
    steps: int,
    step_size: float,
    noise: bool = True,
    init_eps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    trace: bool = False,
) -> tuple[torch.Tensor, ChainTrace | None]:
    """Samples of p_alpha(z), started from the Gaussian hierarchy; returns z (n, Z), detached."""
    device = next(model.parameters()).device
    eps = init_eps if init_eps is not None else torch.randn(n, model.z_dim, device=device)
    if not model.has_ebm:
        # p_alpha is the Gaussian hierarchy itself, sampled exactly by T(eps)
        steps = 0 if mask is None else steps
    with _spectral_norm_once_per_chain(model):
        eps, tr = langevin(
            model.log_prior_eps, eps, steps=steps, step_size=step_size, noise=noise, mask=mask, trace=trace
        )
    with torch.no_grad():
        return model.generator.from_eps(eps), tr


def posterior_langevin(
    model: JointEBM,
    x: torch.Tensor,
    init_z: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: bool = True,
    trace: bool = False,
) -> tuple[torch.Tensor, ChainTrace | None]:
    """Samples of p(z | x) from ``init_z`` (e.g. the inference network's guess); returns z, detached."""
    with torch.no_grad():
        eps0 = model.generator.to_eps(init_z)
    with _spectral_norm_once_per_chain(model):
        eps, tr = langevin(
            lambda e: model.log_joint_eps(x, e), eps0, steps=steps, step_size=step_size, noise=noise, trace=trace
        )
    with torch.no_grad():
        return model.generator.from_eps(eps), tr
