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
- ``posterior_width``  sum of log sigma of q(z | x) along its mean path: how precisely the
                       inference network can place x. Wide where it cannot: on MNIST a held-out
                       digit 1, thin and with little ink (benchmarks/RESULTS.md, issue 14)
- ``latent_knn``       mean distance, in reference coordinates eps, to the k (``score.knn_k``) nearest
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
validation data) of ``Calibration.combine``, plus the one-sided terms of ``Calibration.margins``;
see ``DEFAULT_COMBINATION`` and ``score_margins``. The reference set
holds the posterior means of up to ``score.reference_size`` training images.
Calibration reads held-in images only, never anomaly labels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from .calibration import Calibration, fit_calibration
from .checkpoint import CALIBRATION_FILE, LoadedModel
from .config import ScoreConfig
from .knn import References, knn_points_and_directions, nearest_pair
from .langevin import posterior_langevin
from .model import JointEBM
from .shifts import shifted_copies

REFERENCE_FILE = "reference_latents.safetensors"
# Chosen by measurement (benchmarks/RESULTS.md, "The default score, again"): on 11 models
# (digits 1, 4, 5, 7, 9 at seeds 0 and 1, digit 3 at seed 0) the mean AUPRC of
# latent_knn_cos + latent_knn was 0.806 against 0.734 for the previous default
# (latent_knn + neg_log_prior); a rule written down beforehand then confirmed it on the
# untouched seed-2 models (0.784 against 0.718). Digit 1 is the exception: neg_log_prior
# helps there (0.61 against 0.48 over two seeds). Every other component stays in each output
# row and can be ``top_component``.
DEFAULT_COMBINATION = ("latent_knn_cos", "latent_knn")


def score_margins(cfg: ScoreConfig) -> dict[str, float]:
    """The one-sided terms of the score a config asks for (``Calibration.margins``): component -> tau."""
    return {} if cfg.width_margin is None else {"posterior_width": float(cfg.width_margin)}


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
    names += ["neg_log_prior", "neg_log_joint", "energy_drop", "chain_spread", "posterior_width"]
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


def _infer(model: JointEBM, x: torch.Tensor, cfg: ScoreConfig) -> dict[str, torch.Tensor]:
    """Posterior inference for a batch: z (the chains' mean), the encoder's z0 and q's widths, the chains' spread,
    and (posterior averages on) the averaged -log p(x, z) and reconstruction term."""
    with torch.no_grad():
        z0, q_sigma = model.encoder.posterior(x)  # (B, Z) each: the encoder's mean and q's widths
    out = {"z0": z0, "q_sigma": q_sigma, "z": z0, "spread": torch.zeros(x.shape[0])}
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
            for k in ("neg_log_joint", "recon"):
                out[f"{k}_post"] = per_sample[k].view(chains, x.shape[0]).mean(0)
        zc = zc.view(chains, x.shape[0], -1)  # (C, B, Z)
        out["z"] = zc.mean(0)
        if chains > 1:
            out["spread"] = zc.std(0).mean(-1)
    return out


def _infer_and_score(model: JointEBM, x: torch.Tensor, cfg: ScoreConfig, reference: "References | None") -> BatchScores:
    inferred = _infer(model, x, cfg)
    z, z0, spread = inferred["z"], inferred["z0"], inferred["spread"]
    terms = _terms(model, x, z)
    if "recon_post" in inferred:
        terms["neg_log_joint_post"], terms["recon_post"] = inferred["neg_log_joint_post"], inferred["recon_post"]
    with torch.no_grad():
        if cfg.steps > 0:
            terms["energy_drop"] = (-terms["neg_log_joint"]) - model.log_joint(x, z0)
        else:  # z is the encoder's guess itself
            terms["energy_drop"] = torch.zeros_like(terms["neg_log_joint"])
        terms["chain_spread"] = spread.to(x.device)
        terms["posterior_width"] = inferred["q_sigma"].log().sum(-1)
        eps = model.generator.to_eps(z)
        if reference is not None:
            found = nearest_pair(eps, reference, cfg.knn_k)
            terms["latent_knn"], terms["latent_knn_cos"] = found.points, found.directions
            if cfg.shifts and not model.cfg.is_vector:
                # the nearest of the image and its moved copies: a digit drawn a pixel off its usual place is matched
                # as itself (benchmarks/RESULTS.md, issue 14, "test-time shifts"); a training image's moved copies skip
                # the image itself, as the image does
                moved = shifted_copies(x, model.cfg.data_shape, cfg.shifts)
                moved_eps = model.generator.to_eps(_infer(model, moved, cfg)["z"])
                moved_found = nearest_pair(moved_eps, reference, cfg.knn_k, skip=found.selves.repeat(4))
                for name, d in (("latent_knn", moved_found.points), ("latent_knn_cos", moved_found.directions)):
                    terms[name] = torch.minimum(terms[name], d.view(4, x.shape[0]).amin(0))
            if reference.top is not None:
                top = eps[:, -reference.top_dim :].contiguous()
                terms["latent_knn_top"], terms["latent_knn_cos_top"] = knn_points_and_directions(
                    top, reference.top, cfg.knn_k
                )
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


class Scorer:
    """Batched scoring on one code path for the CLI, the detector, the servers and the benchmark.

    Parameters
    ----------
    loaded : LoadedModel
        From ``checkpoint.load_model``; its reference latents are read from its directory.
    steps : int, optional
        Posterior Langevin steps K (default: the model's ``score.steps``); validated.
    device : str or torch.device, default "cpu"
        Where to score.
    """

    def __init__(self, loaded: LoadedModel, *, steps: int | None = None, device: str | torch.device = "cpu"):
        self.model = loaded.model.to(device).eval()
        self.config = loaded.config
        self.device = torch.device(device)
        # validated: steps=-3 from a command line is a ConfigError, not a silent K = 0
        self.score_cfg = loaded.config.with_overrides(score={"steps": steps}).score
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
        # a vector model fitted on a table with a header: its columns, matched by name when a table is scored
        self.feature_names: list[str] | None = (loaded.meta or {}).get("feature_names")

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
        """Score components of images, in batches of ``score.batch_size`` (no calibration needed).

        Parameters
        ----------
        images01 : np.ndarray
            Images in [0, 1]: (N, H, W), or (N, H, W, 3) for a colour model; (N, d) vectors
            for a vector model.

        Returns
        -------
        BatchScores
            Every component (``component_names``), per-pixel errors and reference coordinates.
        """
        parts = list(self.iter_batches(images01))
        return BatchScores(
            components={k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components},
            pixel_error=np.concatenate([p.pixel_error for p in parts]),
            eps=np.concatenate([p.eps for p in parts]),
        )

    def iter_batches(self, images01: np.ndarray) -> Iterator[BatchScores]:
        """``components_of`` one batch of ``score.batch_size`` at a time.

        Parameters
        ----------
        images01 : np.ndarray
            As for ``components_of``.

        Yields
        ------
        BatchScores
        """
        bs = self.score_cfg.batch_size
        for i in range(0, len(images01), bs):
            x = self.model.to_model_space(images01[i : i + bs], self.device)
            yield infer_and_score(self.model, x, self.score_cfg, self.reference)

    def score(self, images01: np.ndarray) -> dict[str, np.ndarray]:
        """Score inputs with the model's calibration.

        Parameters
        ----------
        images01 : np.ndarray
            As for ``components_of``.

        Returns
        -------
        dict of str to np.ndarray
            Per input: ``score``, ``score_normalized`` (in [0, 1]), ``label`` (1 = anomaly),
            ``top_component`` and every component.

        Raises
        ------
        ValueError
            If the model has no calibration.
        """
        if self.calibration is None:
            raise ValueError("this model has no calibration.json: run `jebm-od calibrate` or refit it")
        bs = self.components_of(images01)
        return self.present(bs)

    def present(self, bs: BatchScores) -> dict[str, np.ndarray]:
        """Calibrated scores of components already computed (what ``score`` returns).

        Parameters
        ----------
        bs : BatchScores
            From ``components_of`` or ``iter_batches``.

        Returns
        -------
        dict of str to np.ndarray
            As ``score``.
        """
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
    margins: dict[str, float] | None = None,
    reference_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Calibration:
    """Store reference latents of training images, then fit the calibration on held-in validation images.

    Writes ``reference_latents.safetensors`` and ``calibration.json`` into the model directory.

    Parameters
    ----------
    loaded : LoadedModel
        A model loaded from its directory.
    train_images : np.ndarray
        Training images in [0, 1]; the reference set is drawn from them.
    val_images : np.ndarray
        Held-in validation images (normal, never used for training); the calibration's only data.
    combine : iterable of str, default DEFAULT_COMBINATION
        The components the score averages.
    margins : dict of str to float, optional
        One-sided terms of the score, component -> tau (default: ``score_margins`` of the model's config).
    reference_size : int, optional
        How many training images the ``latent_knn`` components search (default
        ``score.reference_size``; 0 = every training image).
    seed : int, default 0
        Seed of the pick of reference images.
    device : str or torch.device, default "cpu"
        Where to score.

    Returns
    -------
    Calibration
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
        margins=score_margins(loaded.config.score) if margins is None else margins,
        false_alarm_rate=loaded.config.score.false_alarm_rate,
        score_steps=scorer.score_cfg.steps,
    )
    cal.extra["score_shifts"] = scorer.score_cfg.shifts  # its scales hold for this setting only
    (loaded.path / CALIBRATION_FILE).write_text(json.dumps(cal.to_dict(), indent=2, sort_keys=True))
    loaded.calibration = cal.to_dict()
    return cal
