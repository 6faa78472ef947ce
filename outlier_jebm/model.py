"""The multi-layer generator with a latent-space EBM prior (Cui, Wu, Han 2023).

Notation follows the papers: x is an image scaled to [-1, 1], z_1 is the latent
layer nearest the data and z_L the top one. A batch of latents is one tensor
``z`` of shape (B, sum(z_dims)) holding [z_1, ..., z_L] side by side.

Every variant is one configuration of this module:

- generator ``chain`` (CVPR): p(z_L) = N(0, I), p(z_i | z_{i+1}) = N(mu_i, sigma_i^2),
  p(x | z) = N(g(z_1), s^2 I);
- generator ``ladder`` (ICCV): every z_i ~ N(0, I); h_L = g_L(z_L),
  h_i = g_i([z_i, h_{i+1}]), p(x | z) = N(h_1, s^2 I);
- prior ``gaussian`` (f = 0), ``layerwise`` (f = sum_i f_i(z_i)) or ``joint``
  (f = f([z_1, ..., z_L])), with p(z) proportional to exp(f(z)) p_gauss(z);
- backbone ``mlp`` or ``conv`` (``ConvDecoder``, ``ConvTrunk``) for the decoder of
  p(x | z) and the inference network's trunk; the hierarchy, the priors and
  Langevin act on latent vectors either way.

f is a negative energy: higher f means more probable. Nothing in the code base
uses the opposite sign.

The Gaussian hierarchy is also written as an invertible map z = T(eps) from
reference noise eps ~ N(0, I) (identity for ladder, the usual
reparameterisation for chain). Langevin runs in eps, where every layer has unit
scale, so one step size serves all layers; the target density is the same
distribution (the Jacobian of T cancels against p_gauss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import ConfigError, ModelConfig

LOG_2PI = math.log(2.0 * math.pi)


def mlp(sizes: list[int], *, spectral: bool = False, final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        if spectral:
            linear = nn.utils.parametrizations.spectral_norm(linear)
        layers.append(linear)
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.LeakyReLU(0.2) if spectral else nn.GELU())
    return nn.Sequential(*layers)


# conv backbone: (side of the coarsest feature map, number of stride-2 stages) per image size. As in the
# papers' CIFAR-10 code the 32x32 generator starts from 8x8; 28 starts from 7x7, 64 adds a third stage.
CONV_LAYOUT = {28: (7, 2), 32: (8, 2), 64: (8, 3)}


class ConvDecoder(nn.Module):
    """Top-down conv decoder: (B, n_in) -> (B, D) pre-activation pixels in H, W, C order.

    A linear map to a coarse feature map, then transposed convolutions (kernel 4,
    stride 2, padding 1) that double the side and halve the feature maps down to
    ``width`` at the image size, then a 3x3 convolution to the image channels.
    No normalisation: Langevin and scoring need g(z) to be a function of each z
    alone, whatever the batch. ``Generator.mean_x`` applies the tanh.

    Feature maps are kept channel last in memory (torch's channels_last), as the
    flat x is: on CPU the convolutions run about 2x faster that way, and the
    output flattens to H, W, C order without a copy.
    """

    def __init__(self, n_in: int, image_size: int, channels: int, width: int):
        super().__init__()
        side, stages = CONV_LAYOUT[image_size]
        self.coarse = (side, side, width * 2**stages)  # (h, w, c)
        self.project = nn.Linear(n_in, math.prod(self.coarse))
        # in place: the conv and linear backward passes need their inputs, never their outputs
        layers: list[nn.Module] = [nn.LeakyReLU(0.2, inplace=True)]
        for i in range(stages, 0, -1):
            layers += [nn.ConvTranspose2d(width * 2**i, width * 2 ** (i - 1), 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.up = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.project(h).view(-1, *self.coarse).permute(0, 3, 1, 2)  # (B, c, h, w), channels_last
        y = self.up(y)  # (B, C, H, W), channels_last
        return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1)  # (B, H*W*C)


class ConvTrunk(nn.Module):
    """Bottom-up conv trunk of the inference network, the decoder's mirror: (B, D) -> (B, n_out).

    x in H, W, C order is viewed as (B, C, H, W); a 3x3 convolution to ``width``
    maps, strided convolutions (kernel 4, stride 2, padding 1) that halve the side
    and double the maps down to the coarse feature map, then a linear layer.
    """

    def __init__(self, image_size: int, channels: int, width: int, n_out: int):
        super().__init__()
        side, stages = CONV_LAYOUT[image_size]
        self.image_shape = (image_size, image_size, channels)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        for i in range(stages):
            layers += [nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Flatten(), nn.Linear(width * 2**stages * side * side, n_out), nn.LeakyReLU(0.2, inplace=True)]
        self.down = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x.view(x.shape[0], *self.image_shape).permute(0, 3, 1, 2))  # (B, C, H, W), channels_last


def fast_tanh(y: torch.Tensor) -> torch.Tensor:
    """tanh(y) as 2 sigmoid(2y) - 1: the same function (within 2e-7 in float32), about 2x faster
    than ``torch.tanh`` on a CPU decoder output (``benchmarks/kernels.py``). Without autograd,
    y (a layer's fresh output) is overwritten in place."""
    if y.requires_grad:
        return torch.sigmoid(2.0 * y) * 2.0 - 1.0
    return torch.sigmoid(y.mul_(2.0), out=y).mul_(2.0).sub_(1.0)


def to_model_space(images01: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (N, H, W[, C]) or (N, D) in [0, 1] -> (N, D) float32 in [-1, 1] on ``device``."""
    x = torch.as_tensor(np.asarray(images01, dtype=np.float32) if not torch.is_tensor(images01) else images01)
    return (x.reshape(x.shape[0], -1).to(device=device, dtype=torch.float32) * 2.0) - 1.0


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension: (B, d) -> (B,)."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)


def normal_log_density(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag sigma^2) summed over the last dimension: (B, d) -> (B,)."""
    return -0.5 * (((z - mu) / sigma).pow(2) + 2.0 * sigma.log() + LOG_2PI).sum(-1)


class Generator(nn.Module):
    """The Gaussian hierarchy p_gauss(z) and the observation model p(x | z)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.generator
        self.z_dims = [int(d) for d in cfg.z_dims]
        self.min_sigma = cfg.min_cond_sigma
        # images live in [-1, 1] (a tanh output); standardised vectors are unbounded (a linear output)
        self.bounded_output = not cfg.is_vector
        L = len(self.z_dims)
        D = cfg.data_dim
        if self.kind == "chain":
            # cond[i] maps z_{i+2} to (mu, raw sigma) of z_{i+1} (0-based list, paper's 1-based names)
            self.cond = nn.ModuleList(
                mlp([self.z_dims[i + 1], cfg.cond_hidden, 2 * self.z_dims[i]]) for i in range(L - 1)
            )
            n_in = self.z_dims[0]
        else:
            # top[i] computes h_{i+2} from [z_{i+2}, h_{i+3}]; the decoder computes h_1 from [z_1, h_2]
            top = []
            for i in range(L - 1, 0, -1):
                n_in = self.z_dims[i] + (cfg.cond_hidden if i < L - 1 else 0)
                top.append(mlp([n_in, cfg.cond_hidden], final_activation=True))
            self.top = nn.ModuleList(top)
            # [z_1, h_2]: the lower latent layer and the path from above enter the decoder together
            n_in = self.z_dims[0] + (cfg.cond_hidden if L > 1 else 0)
        if cfg.backbone == "conv":
            self.decoder = ConvDecoder(n_in, cfg.image_size, cfg.channels, cfg.conv_channels)
        else:
            self.decoder = mlp([n_in, *cfg.gen_hidden, D])

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(z, self.z_dims, dim=-1))

    def conditional(self, i: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and sigma of p(z_{i+1} | z_{i+2}) for the 0-based layer index i (chain only)."""
        mu, raw = self.cond[i](z_above).chunk(2, dim=-1)
        return mu, self.min_sigma + F.softplus(raw)

    def log_p_gauss(self, z: torch.Tensor) -> torch.Tensor:
        """Per-layer log-densities of the Gaussian hierarchy: (B, Z) -> (B, L)."""
        zs = self.split(z)
        if self.kind == "ladder":
            return torch.stack([standard_normal_log_density(zi) for zi in zs], dim=-1)
        terms = []
        for i in range(len(zs) - 1):
            mu, sigma = self.conditional(i, zs[i + 1])
            terms.append(normal_log_density(zs[i], mu, sigma))
        terms.append(standard_normal_log_density(zs[-1]))
        return torch.stack(terms, dim=-1)

    def from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """z = T(eps): ancestral sampling of the Gaussian hierarchy from reference noise."""
        if self.kind == "ladder":
            return eps
        es = self.split(eps)
        zs = [None] * len(es)
        zs[-1] = es[-1]
        for i in range(len(es) - 2, -1, -1):
            mu, sigma = self.conditional(i, zs[i + 1])
            zs[i] = mu + sigma * es[i]
        return torch.cat(zs, dim=-1)

    def to_eps(self, z: torch.Tensor) -> torch.Tensor:
        """eps = T^{-1}(z)."""
        if self.kind == "ladder":
            return z
        zs = self.split(z)
        es = []
        for i in range(len(zs) - 1):
            mu, sigma = self.conditional(i, zs[i + 1])
            es.append((zs[i] - mu) / sigma)
        es.append(zs[-1])
        return torch.cat(es, dim=-1)

    def mean_x(self, z: torch.Tensor) -> torch.Tensor:
        """g(z): the mean of p(x | z), (B, Z) -> (B, D), in [-1, 1] for images."""
        zs = self.split(z)
        if self.kind == "chain":
            inp = zs[0]
        else:
            h = None
            for module, zi in zip(self.top, reversed(zs[1:])):
                h = module(zi if h is None else torch.cat([zi, h], dim=-1))
            inp = zs[0] if h is None else torch.cat([zs[0], h], dim=-1)
        out = self.decoder(inp)
        return fast_tanh(out) if self.bounded_output else out


class EnergyPrior(nn.Module):
    """The correction f of the prior: f(z) = sum of ``terms(z)`` (higher = more probable)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.prior
        self.z_dims = [int(d) for d in cfg.z_dims]
        sn = cfg.ebm_spectral_norm
        if self.kind == "layerwise":
            self.nets = nn.ModuleList(mlp([d, *cfg.ebm_hidden, 1], spectral=sn) for d in self.z_dims)
        elif self.kind == "joint":
            self.nets = nn.ModuleList([mlp([sum(self.z_dims), *cfg.ebm_hidden, 1], spectral=sn)])
        else:
            self.nets = nn.ModuleList()

    @property
    def n_terms(self) -> int:
        return len(self.nets)

    def terms(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) -> (B, n_terms): f_i(z_i) per layer (layerwise), f(z) (joint), nothing (gaussian)."""
        if self.kind == "layerwise":
            zs = torch.split(z, self.z_dims, dim=-1)
            return torch.cat([net(zi) for net, zi in zip(self.nets, zs)], dim=-1)
        if self.kind == "joint":
            return self.nets[0](z)
        return z.new_zeros(z.shape[0], 0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.terms(z).sum(-1)


class InferenceNet(nn.Module):
    """Bottom-up q(z | x) = q(z_1 | x) q(z_2 | x, z_1) ... with diagonal Gaussians."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.z_dims = [int(d) for d in cfg.z_dims]
        if cfg.backbone == "conv":
            self.trunk = ConvTrunk(cfg.image_size, cfg.channels, cfg.conv_channels, cfg.enc_hidden[-1])
        else:
            self.trunk = mlp([cfg.data_dim, *cfg.enc_hidden], final_activation=True)
        self.steps = nn.ModuleList()
        heads = [nn.Linear(cfg.enc_hidden[-1], 2 * self.z_dims[0])]
        width = cfg.enc_hidden[-1]
        for d_below, d in zip(self.z_dims[:-1], self.z_dims[1:]):
            self.steps.append(mlp([width + d_below, cfg.cond_hidden], final_activation=True))
            heads.append(nn.Linear(cfg.cond_hidden, 2 * d))
            width = cfg.cond_hidden
        self.heads = nn.ModuleList(heads)

    def _walk(
        self, x: torch.Tensor, pick: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Layer by layer, bottom up: (mu, sigma, z_i) of q(z_i | x, z_{<i}), z_i = ``pick(i, mu, sigma)``
        being what the layers above condition on."""
        h = self.trunk(x)
        below = None
        for i, head in enumerate(self.heads):
            if i > 0:
                h = self.steps[i - 1](torch.cat([h, below], dim=-1))
            mu, raw = head(h).chunk(2, dim=-1)
            sigma = F.softplus(raw) + 1e-3
            below = pick(i, mu, sigma)
            yield mu, sigma, below

    def forward(
        self, x: torch.Tensor, *, sample: bool = True, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw z ~ q(z | x) (or take its mean, or evaluate a given z) and return (z, log q(z | x)).

        x: (B, D) in [-1, 1]. Returns z (B, Z) and log q (B,).
        """
        given = torch.split(z, self.z_dims, dim=-1) if z is not None else None

        def pick(i: int, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if given is not None:
                return given[i]
            return mu + sigma * torch.randn_like(mu) if sample else mu

        zs, log_q = [], x.new_zeros(x.shape[0])
        for mu, sigma, zi in self._walk(x, pick):
            log_q = log_q + normal_log_density(zi, mu, sigma)
            zs.append(zi)
        return torch.cat(zs, dim=-1), log_q

    def log_q_layers(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-layer log q(z_i | x, z_{<i}) of a given z: (B, D), (B, Z) -> (B, L)."""
        given = torch.split(z, self.z_dims, dim=-1)
        walk = self._walk(x, lambda i, mu, sigma: given[i])
        return torch.stack([normal_log_density(zi, mu, sigma) for mu, sigma, zi in walk], dim=-1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The means and widths of q(z | x) along its mean path (each layer conditioned on the mean of the one
        below, as ``forward(x, sample=False)``): (B, D) -> mu (B, Z), sigma (B, Z)."""
        mus, sigmas = zip(*[(mu, sigma) for mu, sigma, _ in self._walk(x, lambda i, mu, sigma: mu)])
        return torch.cat(mus, dim=-1), torch.cat(sigmas, dim=-1)


class JointEBM(nn.Module):
    """Generator, energy prior and inference network: log p(x, z) and log p(z) in one place."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.is_vector and cfg.vector_dim < 1:
            raise ConfigError(
                "model.vector_dim is 0: set it to the number of features (the CLI and the "
                "detector take it from the training data)"
            )
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.ebm = EnergyPrior(cfg)
        self.encoder = InferenceNet(cfg)
        self.obs_sigma = float(cfg.obs_sigma)
        if cfg.is_vector:
            # x = (features - shift) / scale, fitted on the training data (``fit_standardization``) and
            # saved with the weights, so that every surface scores with the training data's scaling
            self.register_buffer("x_shift", torch.zeros(cfg.data_dim))
            self.register_buffer("x_scale", torch.ones(cfg.data_dim))

    def fit_standardization(self, features: np.ndarray) -> None:
        """Vectors only: each feature's mean and std on the training data (std 0 counts as 1)."""
        if not self.cfg.standardize:
            return
        f = torch.as_tensor(np.asarray(features, dtype=np.float64).reshape(len(features), -1))
        std = f.std(0, unbiased=False)
        self.x_shift.copy_(f.mean(0).float())
        self.x_scale.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)).float())

    def to_model_space(self, data: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Inputs as users hand them in -> (N, D) float32 on ``device``: images (N, H, W[, C]) in [0, 1]
        to [-1, 1]; vectors (N, d) standardised (or as they are)."""
        n = len(data)
        if n and math.prod(data.shape[1:]) != self.cfg.data_dim:
            raise ValueError(
                f"inputs of shape {tuple(data.shape[1:])} do not fit this model, which takes "
                f"{self.cfg.data_shape} ({self.cfg.data_dim} values each)"
            )
        if not self.cfg.is_vector:
            return to_model_space(data, device)
        x = torch.as_tensor(
            np.array(data, dtype=np.float32) if not torch.is_tensor(data) else data
        )  # a copy: may be read-only
        x = x.reshape(x.shape[0], -1).to(device=device, dtype=torch.float32)
        return (x - self.x_shift.to(device)) / self.x_scale.to(device)

    def from_model_space(self, x: torch.Tensor) -> np.ndarray:
        """The inverse of ``to_model_space``, shaped as one input is: (N, *data_shape)."""
        if self.cfg.is_vector:
            out = x * self.x_scale.to(x.device) + self.x_shift.to(x.device)
        else:
            out = (x + 1.0) / 2.0
        return out.detach().cpu().numpy().reshape(-1, *self.cfg.data_shape)

    @property
    def z_dim(self) -> int:
        return sum(self.cfg.z_dims)

    @property
    def has_ebm(self) -> bool:
        return self.ebm.n_terms > 0

    def obs_log_norm(self, dim: int) -> float:
        """log of the normaliser of N(x; g(z), s^2 I) in ``dim`` dimensions: dim / 2 * log(2 pi s^2)."""
        return 0.5 * dim * (LOG_2PI + 2 * math.log(self.obs_sigma))

    def recon_error(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """||x - g(z)||^2 / (2 s^2), the reconstruction term of -log p(x | z): (B, D), (B, Z) -> (B,)."""
        s = self.obs_sigma
        return (x - self.generator.mean_x(z)).pow(2).sum(-1) / (2 * s * s)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x; g(z), s^2 I): (B, D), (B, Z) -> (B,)."""
        return -self.recon_error(x, z) - self.obs_log_norm(x.shape[-1])

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised log p_alpha(z) = f(z) + log p_gauss(z): (B, Z) -> (B,)."""
        return self.ebm(z) + self.generator.log_p_gauss(z).sum(-1)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised log p(x, z) = log p(x | z) + log p_alpha(z): the papers' decision function."""
        return self.log_px_given_z(x, z) + self.log_prior(z)

    def log_prior_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The prior in reference coordinates: f(T(eps)) + log N(eps; 0, I)."""
        return self.ebm(self.generator.from_eps(eps)) + standard_normal_log_density(eps)

    def log_joint_eps(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The posterior target in reference coordinates: log p(x | T(eps)) + log p_alpha(eps)."""
        z = self.generator.from_eps(eps)
        return self.log_px_given_z(x, z) + self.ebm(z) + standard_normal_log_density(eps)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "ebm": list(self.ebm.parameters()),
            "gen": list(self.generator.parameters()),
            "enc": list(self.encoder.parameters()),
        }
