"""Anomaly scores from posterior inference: components, the default score, calibration.

For each input x: z from the inference network's mean, then K posterior Langevin
steps (noise off by default, so a score is a deterministic function of x), over
``chains`` chains. The components (higher = more anomalous everywhere):

- ``recon``            ||x - g(z)||^2 / (2 s^2)
- ``neg_f`` / ``neg_f_<i>``  -f(z) (joint) or -f_i(z_i) per layer (layerwise)
- ``neg_log_p_z<i>``   -log p_gauss(z_i | z_{i+1}) per layer (the Gaussian hierarchy)
- ``neg_log_prior``    -(f(z) + log p_gauss(z)), unnormalised
- ``neg_log_joint``    -log p(x, z), unnormalised: the papers' decision function
- ``neg_log_joint_post``, ``recon_post``  (K > 0 with noise or several chains) the posterior
                       averages: -log p(x, z) and the reconstruction term averaged over the
                       chains' final samples, rather than taken at their mean
- ``energy_drop``      how much K steps raised log p(x, z) above the encoder's guess
- ``chain_spread``     spread of z over chains (0 with one chain)
- ``latent_knn``       mean distance, in reference coordinates eps, to the k nearest
                       posterior means of training images (the latent space is where
                       the classes' modes separate)
- ``latent_knn_cos``   the same on directions eps / ||eps||: mean distance between unit
                       vectors (sqrt(2 - 2 cos)) to the k nearest. The norm of eps says how
                       typical a code is under the Gaussian hierarchy; its direction says
                       what it depicts, and a held-out class differs in the latter.
- ``latent_knn_top``, ``latent_knn_cos_top``  (``score.top_knn``, two or more layers; off by
                       default: they did not help and cost about a fifth of the K = 0
                       throughput, benchmarks/RESULTS.md) the same two searches in
                       the top layer's coordinates alone: the layer farthest from the pixels,
                       which the hierarchy leaves what a digit *is*, while the full code also
                       holds how it is drawn.
- ``llr_gt<k>``        (with ``score.llr_samples`` > 0) the hierarchical likelihood ratio of
                       Havtorn et al. (ICML 2021): the bound with z_1..z_k inferred minus the
                       bound with them drawn from the prior given the inferred z_{k+1}..z_L.
                       What the upper (semantic) layers cannot explain shows up here, while
                       low-level pixel statistics cancel. Computed on the Gaussian hierarchy
                       (the EBM correction's conditional normaliser is unknown) with fixed
                       draws, so it is deterministic.

The default score is the mean of robust z-scores (median / MAD on held-in
validation data) of ``Calibration.combine``; see ``DEFAULT_COMBINATION``. The reference set
holds the posterior means of up to ``score.reference_size`` training images.
Calibration reads held-in images only, never anomaly labels.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from . import native
from .checkpoint import CALIBRATION_FILE, LoadedModel
from .config import ScoreConfig
from .langevin import posterior_langevin
from .model import JointEBM

REFERENCE_FILE = "reference_latents.safetensors"
# Chosen by measurement (benchmarks/RESULTS.md, "The default score, again"): on 11 models
# (digits 1, 4, 5, 7, 9 at seeds 0 and 1, digit 3 at seed 0) the mean AUPRC of
# latent_knn_cos + latent_knn was 0.806 against 0.734 for the previous default
# (latent_knn + neg_log_prior); a rule written down beforehand then confirmed it on the
# untouched seed-2 models (0.784 against 0.718). Digit 1 is the exception: neg_log_prior
# helps there (0.61 against 0.48 over two seeds). Every other component stays in each output
# row and can be ``top_component``.
DEFAULT_COMBINATION = ("latent_knn_cos", "latent_knn")
KNN_K = 5
KNN_BLOCK = 64  # columns per block in the two-stage nearest-neighbour search
KNN_CHUNK = 64 * KNN_BLOCK  # reference columns per matrix product in the search
TORCH_SEARCH_ROWS = 500  # queries per product in the torch search (the chunk sizes were tuned at 500)
NATIVE_CHUNK = 1024  # reference columns per pass of the fused kernel (1024 x Z floats stay in L2)


def posterior_averaged(cfg: ScoreConfig) -> bool:
    """Whether scoring draws several posterior samples per input (the ``*_post`` components)."""
    return cfg.steps > 0 and (cfg.noise or cfg.chains > 1)


def component_names(
    model: JointEBM, with_reference: bool, llr_samples: int = 0, posterior: bool = False, top_knn: bool = False
) -> list[str]:
    L = model.cfg.n_layers
    names = ["recon"]
    if model.ebm.kind == "layerwise":
        names += [f"neg_f_{i + 1}" for i in range(L)]
    elif model.ebm.kind == "joint":
        names.append("neg_f")
    names += [f"neg_log_p_z{i + 1}" for i in range(L)]
    names += ["neg_log_prior", "neg_log_joint", "energy_drop", "chain_spread"]
    if posterior:
        names += ["neg_log_joint_post", "recon_post"]
    if with_reference:
        names += ["latent_knn", "latent_knn_cos"]
        if top_knn and L > 1:
            names += ["latent_knn_top", "latent_knn_cos_top"]
    if llr_samples > 0:
        names += [f"llr_gt{k}" for k in range(1, L)]
    return names


@dataclass
class BatchScores:
    components: dict[str, np.ndarray]  # name -> (B,)
    pixel_error: np.ndarray  # (B, *data_shape) squared error per pixel in [0, 1] image units (per feature for vectors)
    eps: np.ndarray  # (B, Z) posterior mean in reference coordinates


@torch.no_grad()
def _terms(model: JointEBM, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    s2 = model.obs_sigma**2
    mean = model.generator.mean_x(z)
    sq = torch.sub(x, mean).square_()
    f_terms = model.ebm.terms(z)
    log_pg = model.generator.log_p_gauss(z)  # (B, L)
    out = {"recon": sq.sum(-1) / (2 * s2), "_sq": sq}
    if model.ebm.kind == "layerwise":
        for i in range(f_terms.shape[1]):
            out[f"neg_f_{i + 1}"] = -f_terms[:, i]
    elif model.ebm.kind == "joint":
        out["neg_f"] = -f_terms[:, 0]
    for i in range(log_pg.shape[1]):
        out[f"neg_log_p_z{i + 1}"] = -log_pg[:, i]
    out["neg_log_prior"] = -(f_terms.sum(-1) + log_pg.sum(-1))
    # -log p(x, z) = -log p(x | z) - log p_alpha(z), from the terms above (no second model pass);
    # equal to -model.log_joint(x, z), which the tests check
    out["neg_log_joint"] = out["recon"] + model.obs_log_norm(x.shape[-1]) + out["neg_log_prior"]
    return out


def infer_and_score(
    model: JointEBM, x: torch.Tensor, cfg: ScoreConfig, reference: "References | None" = None
) -> BatchScores:
    """Posterior inference and every score component for a batch x (B, D) in [-1, 1]."""
    model.eval()
    # the spectral-norm weights of the EBM are computed once per batch, not once per use
    with parametrize.cached():
        return _infer_and_score(model, x, cfg, reference)


def _infer_and_score(model: JointEBM, x: torch.Tensor, cfg: ScoreConfig, reference: "References | None") -> BatchScores:
    with torch.no_grad():
        z0, _ = model.encoder(x, sample=False)  # (B, Z)
    chains = max(cfg.chains, 1) if cfg.steps > 0 else 1
    if cfg.steps > 0:
        xs = x.repeat(chains, 1)
        init = z0.repeat(chains, 1)
        if chains > 1:
            # spread the starts so that chains can disagree; the first chain starts at the encoder's mean
            with torch.no_grad():
                e = model.generator.to_eps(init)
                e[x.shape[0] :] += 0.1 * torch.randn_like(e[x.shape[0] :])
                init = model.generator.from_eps(e)
        zc, _ = posterior_langevin(model, xs, init, steps=cfg.steps, step_size=cfg.step_size, noise=cfg.noise)
        if posterior_averaged(cfg):
            per_sample = _terms(model, xs, zc)
            post = {k: per_sample[k].view(chains, x.shape[0]).mean(0) for k in ("neg_log_joint", "recon")}
        zc = zc.view(chains, x.shape[0], -1)  # (C, B, Z)
        z = zc.mean(0)
        spread = zc.std(0).mean(-1) if chains > 1 else torch.zeros(x.shape[0])
    else:
        z, spread = z0, torch.zeros(x.shape[0])
    terms = _terms(model, x, z)
    if cfg.steps > 0 and posterior_averaged(cfg):
        terms["neg_log_joint_post"], terms["recon_post"] = post["neg_log_joint"], post["recon"]
    with torch.no_grad():
        if cfg.steps > 0:
            terms["energy_drop"] = (-terms["neg_log_joint"]) - model.log_joint(x, z0)
        else:  # z is the encoder's guess itself
            terms["energy_drop"] = torch.zeros_like(terms["neg_log_joint"])
        terms["chain_spread"] = spread.to(x.device)
        eps = model.generator.to_eps(z)
        if reference is not None:
            terms["latent_knn"], terms["latent_knn_cos"] = knn_points_and_directions(eps, reference)
            if reference.top is not None:
                top = eps[:, -reference.top_dim :].contiguous()
                terms["latent_knn_top"], terms["latent_knn_cos_top"] = knn_points_and_directions(top, reference.top)
        if cfg.llr_samples > 0:
            terms.update(likelihood_ratios(model, x, z, cfg.llr_samples))
    sq = terms.pop("_sq")
    if model.cfg.is_vector:  # squared error per feature, in standardised units
        pixel_error = sq
    else:  # [-1, 1] units -> [0, 1] units, (B, H, W[, C])
        pixel_error = (sq / 4.0).reshape(-1, *model.cfg.data_shape)
    return BatchScores(
        components={k: v.detach().cpu().numpy().astype(np.float64) for k, v in terms.items()},
        pixel_error=pixel_error.cpu().numpy(),
        eps=eps.cpu().numpy(),
    )


class Reference:
    """Posterior means of training images (reference coordinates) for ``latent_knn``.

    Keeps [-2 R^T; ||r||^2] (Z + 1, R'), so that [e, 1] times it is ||r||^2 - 2 e.r for a whole
    batch in one matrix product (the batch's own ||e||^2 does not change which rows are nearest).
    R' pads R to a multiple of ``KNN_BLOCK`` with columns at +inf, which are never nearest; the
    matrix is kept in chunks of ``KNN_CHUNK`` columns, searched one after the other so that each
    (B, chunk) product stays in cache: at B = 500 a product over 16 384 columns (32 MB, the
    size of this machine's L3) took twice as long per column as one over 8 192, and the shared
    search of ``References`` (a product and a transformed copy) ran fastest at 4 096. Up to 1.5
    chunks' worth is searched in one product rather than leave a small last chunk.
    """

    def __init__(self, eps: torch.Tensor):
        self.eps = eps.contiguous()
        pad = (-eps.shape[0]) % KNN_BLOCK
        norms = torch.cat([eps.pow(2).sum(1), eps.new_full((pad,), math.inf)])
        weights = torch.cat([-2.0 * eps.t(), eps.new_zeros(eps.shape[1], pad)], dim=1)
        augmented = torch.cat([weights, norms.unsqueeze(0)])
        self.chunk = augmented.shape[1] if augmented.shape[1] <= KNN_CHUNK * 3 // 2 else KNN_CHUNK
        self.chunks = [augmented[:, s : s + self.chunk].contiguous() for s in range(0, augmented.shape[1], self.chunk)]

    def __len__(self) -> int:
        return self.eps.shape[0]


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm (a zero row stays zero)."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


class References:
    """The reference latents prepared for both searches: points (latent_knn) and directions (latent_knn_cos).

    Both searches share one matrix product -2 e.r per query e and reference row r (the points'
    chunks without their norm row). The points' key adds ||r||^2; the directions' order (nearest
    unit vectors first) is that of -(e.r) / ||r||, i.e. the product times ``1 / (2 ||r||)``.
    Both are one pass over the product with per-column vectors (+inf added on padding
    columns). Neither key subtracts two large numbers to recover e.r, so a query of small norm
    keeps its direction. A zero row has no direction: ``unit_rows`` keeps it at zero, at
    distance 1 from every unit vector, which no column transform can express; a reference
    holding one is searched twice instead (``shared_product`` False).
    """

    def __init__(self, eps: torch.Tensor, top_dim: int = 0):
        self.eps = eps
        # the top layer's own searches (``latent_knn_top``): its columns are the last top_dim of eps
        self.top_dim = top_dim
        self.top = References(eps[:, -top_dim:].contiguous()) if 0 < top_dim < eps.shape[1] else None
        self.points = Reference(eps)
        self.unit = unit_rows(eps)  # for the exact distances of the directions' candidates
        self.shared_product = bool((eps.norm(dim=1) > 1e-12).all())
        self.weights = [chunk[:-1] for chunk in self.points.chunks]  # -2 R^T, a contiguous prefix
        # per column (scale, shift) of both keys over all R' columns; the torch search takes chunk slices
        sq = torch.cat([chunk[-1:] for chunk in self.points.chunks], 1)  # ||r||^2, +inf on padding
        pad = torch.isinf(sq)
        self.key_scale = torch.cat([torch.ones_like(sq), torch.where(pad, 1.0, 0.5 / sq.clamp_min(1e-24).sqrt())])
        self.key_shift = torch.cat([sq, torch.where(pad, sq, 0.0)])  # (2, R'): points, directions
        cuts = [(n * self.points.chunk, n * self.points.chunk + w.shape[1]) for n, w in enumerate(self.weights)]
        self.point_keys = [(None, self.key_shift[:1, a:b]) for a, b in cuts]
        self.direction_keys = [(self.key_scale[1:, a:b], self.key_shift[1:, a:b]) for a, b in cuts]

    @functools.cached_property
    def fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared search laid out for the fused kernel: -2 R^T packed in strips of 16 columns
        (R'/16, Z, 16), and per column (scale, shift) of the points' and the directions' keys (2, R')."""
        weights = torch.cat(self.weights, 1)
        packed = weights.view(weights.shape[0], -1, 16).permute(1, 0, 2).contiguous()
        return packed, self.key_scale, self.key_shift

    @functools.cached_property
    def directions(self) -> Reference:
        """The directions' own search matrix: built on first use (the fallback, or a direct search)."""
        return Reference(self.unit)

    def __len__(self) -> int:
        return self.eps.shape[0]


class _BestBlocks:
    """One search's state in ``nearest_columns``: per chunk, the m blocks with the smallest minima."""

    def __init__(self) -> None:
        self.minima: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.block_ids: list[torch.Tensor] = []

    def add(self, blocks: torch.Tensor, m: int, first_block: int, rows: torch.Tensor) -> None:
        low, which = blocks.amin(-1).topk(min(m, blocks.shape[1]), dim=1, largest=False, sorted=False)
        self.minima.append(low)
        self.kept.append(blocks[rows, which])  # (B, m, block), copied out of the buffer
        self.block_ids.append(which + first_block)

    def columns(self, m: int, rows: torch.Tensor) -> torch.Tensor:
        B, block = rows.shape[0], KNN_BLOCK
        low, block_ids = torch.cat(self.minima, 1), torch.cat(self.block_ids, 1)
        best = low.topk(min(m, low.shape[1]), dim=1, largest=False, sorted=False).indices
        candidates = torch.cat(self.kept, 1)[rows, best].reshape(B, best.shape[1] * block)
        pos = candidates.topk(m, dim=1, largest=False, sorted=False).indices
        return block_ids.gather(1, best).gather(1, pos // block) * block + pos % block


Transform = "tuple[torch.Tensor | None, torch.Tensor] | None"


def nearest_columns(
    queries: torch.Tensor,
    chunks: "list[torch.Tensor]",
    chunk: int,
    m: int,
    transforms: "list[list[Transform]] | None" = None,
) -> list[torch.Tensor]:
    """Column indices of the m smallest entries of each row of ``queries @ [chunks...]``, unordered.

    ``chunks`` are the column blocks of one matrix, each ``chunk`` wide but the last.
    ``transforms`` lists one search per entry (default: the product itself); a search has one
    (scale, shift) per chunk and looks at product * scale + shift (scale None: 1), so several
    searches share one product. Exact, without a top-k over whole rows: the m smallest entries
    of a row lie in the m blocks of ``KNN_BLOCK`` columns with the smallest minima. Each
    chunk's product goes into one reused buffer; from it only the chunk's m best blocks are
    kept (their minima and contents). At the end the m best of all kept blocks are chosen and
    searched. Needs m <= the number of real columns (otherwise padding columns would be
    returned) and no autograd (``out=``).
    """
    transforms = transforms or [[None] * len(chunks)]
    B, block = queries.shape[0], KNN_BLOCK
    rows = torch.arange(B, device=queries.device).unsqueeze(1)
    buffer = queries.new_empty(B, chunk)
    scratch = queries.new_empty(B, chunk) if any(t is not None for ts in transforms for t in ts) else None
    searches = [_BestBlocks() for _ in transforms]
    for n, weights in enumerate(chunks):
        width, first = weights.shape[1], n * (chunk // block)
        product = torch.mm(queries, weights, out=buffer[:, :width])
        for search, per_chunk in zip(searches, transforms):
            key = product
            if per_chunk[n] is not None:
                scale, shift = per_chunk[n]
                key = scratch[:, :width]
                if scale is None:
                    torch.add(product, shift, out=key)
                else:
                    torch.addcmul(shift, product, scale, out=key)
            search.add(key.view(B, width // block, block), m, first, rows)
    return [search.columns(m, rows) for search in searches]


def _mean_of_nearest(queries: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Mean exact distance to the k nearest of the candidate rows idx (B, k + 1), skipping the input itself."""
    # a NaN query has NaN keys everywhere and may pick padding columns: keep its index in range
    # (its distances are NaN anyway) so that it cannot fail the other rows of the batch
    idx = idx.clamp_max(rows.shape[0] - 1)
    candidates = rows.index_select(0, idx.reshape(-1)).view(
        *idx.shape, rows.shape[1]
    )  # row copies, not a gather per entry
    near = (candidates - queries.unsqueeze(1)).pow(2).sum(-1).sqrt().sort(dim=1).values  # exact, ascending
    is_self = near[:, :1] < 1e-5
    return torch.where(is_self, near[:, 1:].mean(1, keepdim=True), near[:, :k].mean(1, keepdim=True)).squeeze(1)


@torch.no_grad()
def knn_mean_distance(eps: torch.Tensor, reference: "Reference | torch.Tensor", k: int = KNN_K) -> torch.Tensor:
    """Mean Euclidean distance from each row of eps (B, Z) to its k nearest reference rows.

    A reference row at distance below 1e-5 is the input itself (a training image scored
    against the set it belongs to) and is skipped. Candidates are picked on ||r||^2 - 2 e.r,
    then their distances are recomputed exactly, so no cancellation error reaches the result.
    """
    ref = reference if isinstance(reference, Reference) else Reference(reference)
    k = min(k, len(ref) - 1)
    lifted = torch.cat([eps, eps.new_ones(eps.shape[0], 1)], dim=1)
    (idx,) = nearest_columns(lifted, ref.chunks, ref.chunk, k + 1)
    return _mean_of_nearest(eps, ref.eps, idx, k)


@torch.no_grad()
def knn_points_and_directions(
    eps: torch.Tensor, references: References, k: int = KNN_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_knn`` and ``latent_knn_cos`` from one product against the reference set.

    The same values as ``knn_mean_distance(eps, references.points)`` and
    ``knn_mean_distance(unit_rows(eps), references.directions)``, up to which of two rows at
    (almost) the same distance is taken; each distance is recomputed exactly.
    """
    if not references.shared_product:
        return (
            knn_mean_distance(eps, references.points, k),
            knn_mean_distance(unit_rows(eps), references.directions, k),
        )
    k = min(k, len(references) - 1)
    if native.usable_for(eps):
        packed, scale, shift = references.fused
        idx = native.candidates(eps, packed, scale, shift, k + 1, NATIVE_CHUNK)
        idx_points, idx_directions = idx[:, 0], idx[:, 1]
    else:  # at most TORCH_SEARCH_ROWS queries per product, so that a product chunk stays in cache
        parts = [
            nearest_columns(
                part,
                references.weights,
                references.points.chunk,
                k + 1,
                [references.point_keys, references.direction_keys],
            )
            for part in eps.split(TORCH_SEARCH_ROWS)
        ]  # an empty batch is one empty part
        idx_points, idx_directions = (torch.cat(found) for found in zip(*parts))
    return (
        _mean_of_nearest(eps, references.points.eps, idx_points, k),
        _mean_of_nearest(unit_rows(eps), references.unit, idx_directions, k),
    )


LLR_SEED = 20210701


@torch.no_grad()
def likelihood_ratios(model: JointEBM, x: torch.Tensor, z: torch.Tensor, samples: int) -> dict[str, torch.Tensor]:
    """``llr_gt<k>`` = L(x) - L^{>k}(x) for k = 1..L-1 (higher = more anomalous).

    L(x): the bound at the posterior point z, log p(x | z) + sum_{i<=k} [log p(z_i | z_{i+1})
    - log q(z_i | x, z_{<i})]; the layers above k enter both bounds alike and cancel.
    L^{>k}(x): log mean_s p(x | z'_s), z'_s keeping z_{k+1}..z_L and drawing z_1..z_k from the
    Gaussian hierarchy given them (``samples`` fixed reference draws shared by every input).
    """
    L = model.cfg.n_layers
    dims = model.generator.z_dims
    B = x.shape[0]
    log_px = model.log_px_given_z(x, z)  # (B,)
    log_pg = model.generator.log_p_gauss(z)  # (B, L)
    log_q = model.encoder.log_q_layers(x, z)  # (B, L)
    eps = model.generator.to_eps(z)
    gen = torch.Generator().manual_seed(LLR_SEED)
    draws = torch.randn(samples, sum(dims), generator=gen).to(x.device)
    out = {}
    for k in range(1, L):
        n_low = sum(dims[:k])
        e = eps.unsqueeze(0).repeat(samples, 1, 1)  # (S, B, Z)
        e[:, :, :n_low] = draws[:, None, :n_low]
        zk = model.generator.from_eps(e.reshape(samples * B, -1))
        log_px_k = model.log_px_given_z(x.repeat(samples, 1), zk).view(samples, B)
        upper_only = torch.logsumexp(log_px_k, dim=0) - math.log(samples)
        full = log_px + (log_pg[:, :k] - log_q[:, :k]).sum(-1)
        out[f"llr_gt{k}"] = full - upper_only
    return out


@dataclass
class Calibration:
    """Held-in statistics that turn components into one score, a label and a number in [0, 1]."""

    combine: list[str]
    median: dict[str, float]
    scale: dict[str, float]
    threshold: float
    score_scale: float
    false_alarm_rate: float
    n_validation: int
    score_steps: int
    notes: str = "score = mean robust z-score of `combine`; normalized = logistic((score - threshold) / score_scale)"
    extra: dict = field(default_factory=dict)

    def robust_z(self, components: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (components[k] - self.median[k]) / self.scale[k] for k in self.median if k in components}

    def score(self, components: dict[str, np.ndarray]) -> np.ndarray:
        z = self.robust_z(components)
        return np.mean([z[k] for k in self.combine], axis=0)

    def normalize(self, score: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip((score - self.threshold) / self.score_scale, -50, 50)))

    def top_component(self, components: dict[str, np.ndarray]) -> list[str]:
        z = self.robust_z(components)
        names = sorted(z)
        stacked = np.stack([z[k] for k in names], axis=1)
        return [names[i] for i in stacked.argmax(1)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)


def _robust_scale(v: np.ndarray) -> float:
    mad = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    return mad if mad > 1e-8 else max(float(np.std(v)), 1e-8)


def fit_calibration(
    components: dict[str, np.ndarray], *, combine: Iterable[str], false_alarm_rate: float, score_steps: int
) -> Calibration:
    """Fit on held-in validation components only: robust centre/scale per component, threshold at the FAR."""
    combine = [c for c in combine if c in components]
    if not combine:
        raise ValueError("none of the components to combine were computed")
    median = {k: float(np.median(v)) for k, v in components.items()}
    scale = {k: _robust_scale(v) for k, v in components.items()}
    cal = Calibration(
        combine=combine,
        median=median,
        scale=scale,
        threshold=0.0,
        score_scale=1.0,
        false_alarm_rate=false_alarm_rate,
        n_validation=len(next(iter(components.values()))),
        score_steps=score_steps,
    )
    s = cal.score(components)
    cal.threshold = float(np.quantile(s, 1.0 - false_alarm_rate))
    cal.score_scale = _robust_scale(s)
    return cal


class Scorer:
    """Batched scoring on one code path for the CLI, the detector, the servers and the benchmark."""

    def __init__(self, loaded: LoadedModel, *, steps: int | None = None, device: str | torch.device = "cpu"):
        self.model = loaded.model.to(device).eval()
        self.config = loaded.config
        self.device = torch.device(device)
        cfg = loaded.config.score
        self.score_cfg = ScoreConfig(**{**asdict(cfg), **({"steps": steps} if steps is not None else {})})
        self.score_cfg.validate()  # e.g. steps=-3 from a command line is a ConfigError, not a silent K = 0
        self.calibration = Calibration.from_dict(loaded.calibration) if loaded.calibration else None
        self.reference = None
        if loaded.path is not None and (loaded.path / REFERENCE_FILE).is_file():
            self.reference = reference_set(
                self.model,
                load_file(str(loaded.path / REFERENCE_FILE))["eps"].to(self.device),
                top_knn=self.score_cfg.top_knn,
            )
        self.image_size = loaded.config.model.image_size
        self.channels = loaded.config.model.channels  # 1: inputs (N, S, S); 3: (N, S, S, 3)

    @property
    def component_names(self) -> list[str]:
        """The components this scorer computes, in output order."""
        return component_names(
            self.model,
            self.reference is not None,
            self.score_cfg.llr_samples,
            posterior_averaged(self.score_cfg),
            self.score_cfg.top_knn,
        )

    def components_of(self, images01: np.ndarray) -> BatchScores:
        """Score components of images (N, H, W) in [0, 1], in batches of ``score.batch_size``."""
        parts = list(self.iter_batches(images01))
        return BatchScores(
            components={k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components},
            pixel_error=np.concatenate([p.pixel_error for p in parts]),
            eps=np.concatenate([p.eps for p in parts]),
        )

    def iter_batches(self, images01: np.ndarray) -> Iterator[BatchScores]:
        bs = self.score_cfg.batch_size
        for i in range(0, len(images01), bs):
            x = self.model.to_model_space(images01[i : i + bs], self.device)
            yield infer_and_score(self.model, x, self.score_cfg, self.reference)

    def score(self, images01: np.ndarray) -> dict[str, np.ndarray]:
        """Per input: score, score_normalized, label (1 = anomaly), top_component and every component."""
        if self.calibration is None:
            raise ValueError("this model has no calibration.json: run `jebm-od calibrate` or refit it")
        bs = self.components_of(images01)
        return self.present(bs)

    def present(self, bs: BatchScores) -> dict[str, np.ndarray]:
        cal = self.calibration
        s = cal.score(bs.components)
        out = {
            "score": s,
            "score_normalized": cal.normalize(s),
            "label": (s > cal.threshold).astype(np.int64),
            "top_component": np.array(cal.top_component(bs.components), dtype=object),
        }
        out.update(bs.components)
        return out


def reference_set(model: JointEBM, eps: torch.Tensor, top_knn: bool = False) -> References:
    """The reference latents prepared for the model's searches (``top_knn``: the top layer's too, with two or more
    layers)."""
    dims = model.cfg.z_dims
    return References(eps, top_dim=dims[-1] if top_knn and len(dims) > 1 else 0)


def reference_latents(scorer: "Scorer", train_images: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Posterior means (reference coordinates) of ``size`` training images drawn with ``seed`` (0 = all)."""
    n = len(train_images) if size <= 0 else min(size, len(train_images))
    pick = np.sort(np.random.default_rng(seed).choice(len(train_images), size=n, replace=False))
    keep, scorer.reference = scorer.reference, None
    try:
        return np.ascontiguousarray(scorer.components_of(train_images[pick]).eps, dtype=np.float32)
    finally:
        scorer.reference = keep


def calibrate(
    loaded: LoadedModel,
    train_images: np.ndarray,
    val_images: np.ndarray,
    *,
    combine: Iterable[str] = DEFAULT_COMBINATION,
    reference_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Calibration:
    """Store reference latents of training images, then fit the calibration on held-in validation images.

    ``reference_size`` (default ``score.reference_size``; 0 = every training image) sets how
    many training images the ``latent_knn`` components search.
    """
    if loaded.path is None:
        raise ValueError("calibration is written into a model directory; load the model from one")
    size = loaded.config.score.reference_size if reference_size is None else reference_size
    scorer = Scorer(loaded, device=device)
    ref = reference_latents(scorer, train_images, size, seed)
    save_file({"eps": torch.from_numpy(ref)}, str(loaded.path / REFERENCE_FILE))
    scorer.reference = reference_set(
        scorer.model, torch.from_numpy(ref).to(scorer.device), top_knn=scorer.score_cfg.top_knn
    )
    comps = scorer.components_of(val_images).components
    cal = fit_calibration(
        comps,
        combine=combine,
        false_alarm_rate=loaded.config.score.false_alarm_rate,
        score_steps=scorer.score_cfg.steps,
    )
    (loaded.path / CALIBRATION_FILE).write_text(json.dumps(cal.to_dict(), indent=2, sort_keys=True))
    loaded.calibration = cal.to_dict()
    return cal
