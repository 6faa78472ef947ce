"""Training: the variational and the MLE scheme of the papers, in one visible loop.

variational (default): maximise the ELBO of an inference network q(z | x), with
the log-partition gradient of the EBM prior estimated by prior Langevin:

    loss = -E_q[log p(x|z) + f(z) + log p_gauss(z) - log q(z|x)] + E_{p_alpha}[f(z) + log p_gauss(z)]

mle (CVPR joint training): posterior and prior both by short-run Langevin,

    loss = -E_{p(z|x)}[log p(x, z)] + E_{p_alpha}[f(z) + log p_gauss(z)]

(samples held fixed), and the inference network learns to start the posterior
chains by maximising log q(z_posterior | x). The prior term's gradient is
grad log Z; its value is not the log-likelihood, so the monitored -ELBO adds an
importance-sampling estimate of log Z = log E_{p_gauss}[exp f(z)].
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import load_train_state, save_model, save_train_state
from .config import Config
from .langevin import posterior_langevin, prior_langevin
from .model import JointEBM, to_model_space  # noqa: F401  (re-exported: the image map)
from .shifts import random_shifts


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf; the last good checkpoint is kept."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available (try --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: JointEBM, config: Config) -> torch.optim.Adam:
    t = config.train
    lrs = {"ebm": t.lr_ebm, "gen": t.lr_gen, "enc": t.lr_enc}
    groups = [
        {"params": params, "lr": lrs[name], "name": name} for name, params in model.parameter_groups().items() if params
    ]
    return torch.optim.Adam(groups, betas=(0.5, 0.999) if model.has_ebm else (0.9, 0.999))


def log_partition_estimate(model: JointEBM, n: int) -> torch.Tensor:
    """log Z = log E_{p_gauss}[exp f(z)], importance-sampled from the Gaussian hierarchy (monitoring only)."""
    if not model.has_ebm:
        return torch.zeros(())
    with torch.no_grad():
        eps = torch.randn(n, model.z_dim, device=next(model.parameters()).device)
        f = model.ebm(model.generator.from_eps(eps))
        return torch.logsumexp(f, 0) - math.log(n)


def training_prior_chain(model: JointEBM, n: int, config: Config, trace: bool = False):
    """``n`` samples of the prior chain with ``train.prior_langevin``'s settings: (z, trace or None)."""
    pr = config.train.prior_langevin
    return prior_langevin(model, n, steps=pr.steps, step_size=pr.step_size, noise=pr.noise, trace=trace)


def training_posterior_chain(model: JointEBM, x: torch.Tensor, config: Config, trace: bool = False):
    """The mle scheme's posterior chain on ``x`` with ``train.posterior_langevin``'s settings, started from the
    inference network's sample (``train.mle_init_from_encoder``) or the Gaussian hierarchy: (z, trace or None)."""
    t = config.train
    with torch.no_grad():
        if t.mle_init_from_encoder:
            z0, _ = model.encoder(x, sample=True)
        else:
            z0 = model.generator.from_eps(torch.randn(x.shape[0], model.z_dim, device=x.device))
    pl = t.posterior_langevin
    return posterior_langevin(model, x, z0, steps=pl.steps, step_size=pl.step_size, noise=pl.noise, trace=trace)


def loss_terms(model: JointEBM, x: torch.Tensor, config: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch x (B, D) and the terms worth monitoring."""
    t = config.train
    stats: dict[str, torch.Tensor] = {}
    if t.scheme == "variational":
        z, log_q = model.encoder(x, sample=True)  # (B, Z), (B,)
        log_px = model.log_px_given_z(x, z)
        f_pos = model.ebm(z)
        log_pg = model.generator.log_p_gauss(z).sum(-1)
        positive = (log_px + f_pos + log_pg - log_q).mean()
        enc_loss = torch.zeros((), device=x.device)
        stats["kl_gauss"] = (log_q - log_pg).mean().detach()
    else:
        z, _ = training_posterior_chain(model, x, config)
        log_px = model.log_px_given_z(x, z)
        f_pos = model.ebm(z)
        log_pg = model.generator.log_p_gauss(z).sum(-1)
        positive = (log_px + f_pos + log_pg).mean()
        _, log_q = model.encoder(x, z=z)
        enc_loss = -log_q.mean()
    loss = -positive + enc_loss
    if model.has_ebm:
        z_neg, _ = training_prior_chain(model, x.shape[0], config)
        f_neg = model.ebm(z_neg)
        loss = loss + (f_neg + model.generator.log_p_gauss(z_neg).sum(-1)).mean()
        loss = loss + t.ebm_l2 * (f_pos.pow(2).mean() + f_neg.pow(2).mean())
        stats["f_prior"] = f_neg.mean().detach()
        stats["f_abs_max"] = torch.maximum(f_pos.abs().max(), f_neg.abs().max()).detach()
    stats["f_posterior"] = f_pos.mean().detach()
    if "f_prior" in stats:
        stats["f_gap"] = stats["f_posterior"] - stats["f_prior"]
    stats["recon"] = (-log_px.detach() - model.obs_log_norm(x.shape[-1])).mean()  # ||x - g(z)||^2 / (2 s^2)
    stats["loss"] = loss.detach()
    return loss, stats


class TrainingLoss(nn.Module):
    """``loss_terms`` as a module's forward, the form DistributedDataParallel wraps.

    The Langevin chains inside take gradients with respect to the latents only
    (torch.autograd.grad), which never reaches DDP's parameter hooks; every
    parameter gets its gradient from the one backward pass of the loss, in both
    schemes, so DDP needs no search for unused parameters.
    """

    def __init__(self, model: JointEBM, config: Config):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return loss_terms(self.model, x, self.config)


def batch_size_per_rank(n: int, batch_size: int, world_size: int = 1) -> int:
    return max(1, min(batch_size, n // world_size))


def planned_epochs(config: Config, n: int, world_size: int = 1) -> int:
    """``train.epochs``, raised where needed to reach ``train.min_steps`` optimiser steps on n images."""
    t = config.train
    return max(t.epochs, math.ceil(t.min_steps / steps_per_epoch(n, t.batch_size, world_size)))


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps in one epoch of n images; each step takes world_size * batch_size of them."""
    return n // (batch_size_per_rank(n, batch_size, world_size) * world_size)


# Under mle the held-in -ELBO's importance estimate of log Z (Gaussian draws) falls behind as the EBM sharpens, so
# the figure drops by tens of nats an epoch without the model improving that much (benchmarks/RESULTS.md, "The
# breakdown guard"): progress output marks it, and says why once.
MLE_ELBO_NOTE = (
    "* under mle the held-in -ELBO's importance estimate of log Z falls behind the EBM, so the figure runs low "
    "and is not comparable between epochs; val recon (the breakdown guard's figure) is comparable"
)


def held_in_elbo_label(scheme: str) -> str:
    """How progress output names the held-in -ELBO under ``scheme`` (marked under mle: see ``MLE_ELBO_NOTE``)."""
    return "val -ELBO*" if scheme == "mle" else "val -ELBO"


@torch.no_grad()
def validation_figures(model: JointEBM, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Per held-in image: ``val_neg_elbo``, the -ELBO with the importance-sampled log Z (lower is better), and
    ``val_recon``, the reconstruction error ||x - g(z)||^2 / (2 s^2) at the inference network's mean codes."""
    was_training = model.training
    model.eval()
    elbo = recon = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        z, log_q = model.encoder(xb, sample=True)
        elbo += (model.log_joint(xb, z) - log_q).sum().item()
        mean, _ = model.encoder(xb, sample=False)
        recon += model.recon_error(xb, mean).sum().item()
    log_z = log_partition_estimate(model, 2000).item()
    model.train(was_training)
    return {"val_neg_elbo": -elbo / x.shape[0] + log_z, "val_recon": recon / x.shape[0]}


def chain_diagnostics(model: JointEBM, config: Config, x: torch.Tensor) -> dict[str, list[float]]:
    """The mean log-density along chains run with training's settings, on one batch: the diagnostic that says whether a
    chain still climbs at its last step (too short) or falls (too large a step).

    ``prior_chain``: the prior chain (models with an EBM), log of the unnormalised p_alpha in whitened coordinates,
    f(z) + log N(eps; 0, I). ``posterior_chain`` (scheme ``mle``): log p(x, z) in the same coordinates, on the first
    images of ``x``, from the inference network's guess as training starts it. Each list has steps + 1 values (before
    each step and at the end). Run in eval mode (no spectral-norm power iteration, no parameter or buffer changes)
    and with the random state restored afterwards, so a fit with this diagnostic trains exactly as one without.
    """
    t = config.train
    n = min(t.batch_size, x.shape[0])
    out: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if model.has_ebm:
                out["prior_chain"] = training_prior_chain(model, n, config, trace=True)[1].log_density.tolist()
            if t.scheme == "mle":
                _, trace = training_posterior_chain(model, x[:n], config, trace=True)
                out["posterior_chain"] = trace.log_density.tolist()
    finally:
        model.train(was_training)
    return out


@dataclass
class FitResult:
    out_dir: Path
    epochs_done: int  # epochs of the weights in out_dir (fewer than trained when the breakdown guard stopped)
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch trained, the stopped one included
    stopped: str = ""  # why the breakdown guard stopped training and which epoch it kept; "" when it did not
    # the mean log-density along each training chain at the last epoch trained (``chain_diagnostics``)
    chains: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class BestEpoch:
    """The epoch with the lowest held-in reconstruction error so far, with copies of its weights and Adam state.

    ``check`` says whether an epoch's error rose more than ``train.max_recon_rise`` nats per data dimension
    above the best: a fit that breaks down with every value finite (one mle fit's reconstruction went
    80 -> 104 in its last epoch, so the NaN guard had nothing to catch) is then stopped and given back the
    best epoch's weights. The figure is the error at the inference network's mean codes (``validation_figures``):
    deterministic, and blind to the EBM's scale, unlike the held-in -ELBO, whose Gaussian-proposal estimate
    of log Z falls behind f on the codes as the EBM sharpens (``benchmarks/RESULTS.md``).
    """

    max_rise_per_dim: float
    data_dim: int
    epoch: int = -1
    value: float = math.inf
    global_step: int = 0
    model_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None

    @property
    def margin(self) -> float:
        return self.max_rise_per_dim * self.data_dim

    def check(self, epoch: int, value: float, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> str:
        """Keep the epoch if it is the best so far; return why training should stop ("" to go on)."""
        if math.isfinite(value) and value < self.value:
            self.epoch, self.value, self.global_step = epoch, value, step
            self.model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.optimizer_state = copy.deepcopy(optimizer.state_dict())
            return ""
        if self.max_rise_per_dim <= 0 or self.model_state is None:
            return ""
        if math.isfinite(value) and value - self.value <= self.margin:
            return ""
        what = (
            f"held-in reconstruction error {value:.1f} at epoch {epoch + 1}, {value - self.value:+.1f} above epoch "
            f"{self.epoch + 1}'s {self.value:.1f} (train.max_recon_rise {self.max_rise_per_dim:g} nats per dimension "
            f"x {self.data_dim} = {self.margin:.1f})"
            if math.isfinite(value)
            else f"held-in reconstruction error not finite at epoch {epoch + 1} (epoch {self.epoch + 1}'s: {self.value:.1f})"
        )
        return f"{what}; stopped, keeping epoch {self.epoch + 1}'s weights"

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        assert self.model_state is not None and self.optimizer_state is not None
        model.load_state_dict(self.model_state)
        optimizer.load_state_dict(self.optimizer_state)


StepHook = Callable[[int, int, dict[str, float]], None]  # (epoch, step in epoch, stats)
EpochHook = Callable[[int, dict[str, float], JointEBM], None]


def fit(
    model: JointEBM,
    config: Config,
    train_images: np.ndarray,
    val_images: np.ndarray | None,
    out_dir: str | Path,
    **kwargs: Any,
) -> FitResult:
    """Train ``model`` (see ``_fit``) with torch's intra-op threads set to ``train.threads`` (0: as they are).

    Small models (vectors) run many tiny operations per step, where extra threads mostly wait on
    each other, badly so when another process holds a core (``benchmarks/RESULTS.md``, "Vectors").
    The setting is restored after.
    """
    threads = config.train.threads
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _fit(model, config, train_images, val_images, out_dir, **kwargs)
    finally:
        if threads:
            torch.set_num_threads(before)


def _fit(
    model: JointEBM,
    config: Config,
    train_images: np.ndarray,
    val_images: np.ndarray | None,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    on_step: StepHook | None = None,
    on_epoch: EpochHook | None = None,
) -> FitResult:
    """Train ``model`` on images (N, H, W) in [0, 1]; write a checkpoint to ``out_dir`` after every epoch.

    A non-finite loss or gradient, or a loss beyond ``train.max_abs_loss``, raises
    TrainingDiverged before the optimiser step, so the weights of the last finished
    epoch stay on disk untouched.

    Inside an initialised torch.distributed process group (``torchrun``) every
    rank calls this with the same model, config and images: training is data
    parallel (DistributedDataParallel), each rank takes ``batch_size`` images of a
    global batch of ``world_size * batch_size``, and only rank 0 validates,
    writes checkpoints and calls the hooks. The statistics passed on are
    averages over all ranks.
    """
    t = config.train
    out_dir = Path(out_dir)
    device = torch.device(device)
    model.to(device).train()
    world, rank = distributed.current_world()
    main = rank == 0
    loss_fn: nn.Module = TrainingLoss(model, config)
    if world > 1:
        # DDP broadcasts rank 0's weights and buffers; then each rank draws its own noise
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(distributed.rank_seed(t.seed, rank))
    optimizer = make_optimizer(model, config)
    start_epoch, global_step = 0, 0
    if resume:
        progress = load_train_state(out_dir, optimizer)
        start_epoch, global_step = progress["epoch"], progress["global_step"]
    if model.cfg.is_vector and not resume:
        model.fit_standardization(train_images)  # before DDP or training reads the buffers
    x_all = model.to_model_space(train_images, device)
    x_val = model.to_model_space(val_images, device) if val_images is not None and len(val_images) else None
    n = x_all.shape[0]
    bs = batch_size_per_rank(n, t.batch_size, world)
    n_steps = steps_per_epoch(n, t.batch_size, world)
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, float]] = []
    meta = dict(meta or {})
    best = BestEpoch(config.recon_rise_guard, model.cfg.data_dim)
    guard = best.max_rise_per_dim > 0 and x_val is not None
    if resume and guard and progress.get("best_epoch") == start_epoch - 1:
        # the checkpoint resumed from is the best epoch so far (as after a stop): the guard carries on from it
        best.check(start_epoch - 1, progress["best_value"], model, optimizer, global_step)
    stopped = ""
    chains: dict[str, list[float]] = {}
    epochs_done = t.epochs
    for epoch in range(start_epoch, t.epochs):
        shuffle = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=shuffle).to(device)
        sums: dict[str, float] = {}
        start = time.perf_counter()
        for step in range(n_steps):
            xb = x_all[distributed.batch_shard(order, step, bs, rank, world)]
            if t.shifts:  # each image moved by its own random whole-pixel offset
                xb = random_shifts(xb, model.cfg.data_shape, t.shifts)
            loss, stats = loss_fn(xb)
            # a finite loss beyond max_abs_loss is a runaway, stopped like a NaN
            usable = torch.isfinite(loss) & (loss.detach().abs() <= t.max_abs_loss)
            finite = bool(usable)
            if world > 1:
                finite, stats = distributed.agree_on_step(usable, stats)
            optimizer.zero_grad(set_to_none=True)
            if finite:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            else:
                grad_norm = torch.tensor(float("nan"))
            if not (finite and torch.isfinite(grad_norm)):
                kept = (
                    f"the last good checkpoint (epoch {epoch}) is in {out_dir}"
                    if epoch > 0
                    else "no checkpoint was written yet"
                )
                where = f" on at least one of {world} ranks" if world > 1 else ""
                if finite:
                    what = "non-finite gradient"
                elif bool(torch.isfinite(loss)) and float(loss.detach().abs()) > t.max_abs_loss:
                    what = f"runaway loss {float(loss.detach()):.3g} (beyond train.max_abs_loss = {t.max_abs_loss:g})"
                else:
                    what = "non-finite loss"
                raise TrainingDiverged(
                    f"{what}{where} at epoch {epoch + 1}, "
                    f"step {step + 1} (global step {global_step + 1}); {kept}. Check the input data for NaN/Inf, "
                    "or lower the EBM learning rate / Langevin step size."
                )
            optimizer.step()
            global_step += 1
            values = {k: float(v) for k, v in stats.items()}
            values["grad_norm"] = float(grad_norm)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if on_step is not None and main:
                on_step(epoch, step, values)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        metrics = {k: v / max(n_steps, 1) for k, v in sums.items()}
        metrics["seconds_per_epoch"] = seconds
        metrics["images_per_second"] = n_steps * bs * world / seconds
        history.append(metrics)
        val = math.nan
        if main:
            # rank 0 alone here; the other ranks wait for it (the guard's broadcast, or the next step's all-reduce)
            metrics["log_z_estimate"] = float(log_partition_estimate(model, 2000))
            if x_val is not None:
                metrics.update(validation_figures(model, x_val))
                val = metrics["val_recon"]
            chains = chain_diagnostics(model, config, x_val if x_val is not None and len(x_val) else x_all)
            for name, values in chains.items():
                metrics[f"{name}_log_density_start"], metrics[f"{name}_log_density_end"] = values[0], values[-1]
        if guard:
            # every rank keeps the same best epoch (DDP keeps their weights equal), so every rank can go back to it
            val = distributed.broadcast_value(val, device) if world > 1 else val
            stopped = best.check(epoch, val, model, optimizer, global_step)
        if main and on_epoch is not None:
            on_epoch(epoch, metrics, model)
        if stopped:  # the breakdown guard: the best epoch's weights become the model, as if training ended there
            best.restore(model, optimizer)
            epoch, global_step = best.epoch, best.global_step
            meta["stopped_early"] = stopped
        if main:
            meta.update({"epochs_done": epoch + 1, "global_step": global_step})
            save_model(model, config, out_dir, meta)
            progress = {"epoch": epoch + 1, "global_step": global_step}
            if guard:
                progress.update(best_epoch=best.epoch, best_value=best.value)
            save_train_state(out_dir, optimizer, progress)
        if stopped:
            epochs_done = epoch + 1
            break
    if world > 1:
        distributed.share_buffers_of_rank0(model)
    model.eval()
    return FitResult(out_dir=out_dir, epochs_done=epochs_done, history=history, stopped=stopped, chains=chains)
