"""Configuration: plain dataclasses loaded from YAML, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GENERATOR_KINDS = ("chain", "ladder")
BACKBONES = ("mlp", "conv")
DATA_KINDS = ("image", "vector")
CHANNELS = (1, 3)
CONV_IMAGE_SIZES = (28, 32, 64)
PRIOR_KINDS = ("gaussian", "layerwise", "joint")
SCHEMES = ("variational", "mle")


class ConfigError(ValueError):
    """A configuration field is missing, unknown or out of range."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"line {line}: key {key!r} given a second time in one mapping (first on line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, where it would let the last one win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


@dataclass
class ModelConfig:
    # image: (H, W) or (H, W, C) pixels in [0, 1], modelled in [-1, 1] with a tanh output;
    # vector: d plain features, modelled after an optional standardisation with a linear output
    data_kind: str = "image"
    image_size: int = 28
    channels: int = 1  # 1 (grayscale) | 3 (RGB); images only
    vector_dim: int = 0  # d, the number of features (vectors only; 0 in a config file: set from the training data)
    standardize: bool = True  # vectors only: centre and scale each feature by the training data's mean and std
    backbone: str = "mlp"  # mlp | conv (images only): the generator's and the inference network's layers
    conv_channels: int = 32  # conv backbone: feature maps at the finest resolution (doubled at each coarser one)
    generator: str = "chain"  # chain (CVPR) | ladder (ICCV)
    prior: str = "joint"  # gaussian | layerwise | joint
    z_dims: list[int] = field(default_factory=lambda: [32, 16])  # z_1 (nearest the data) ... z_L
    gen_hidden: list[int] = field(default_factory=lambda: [256, 512])  # g: z_1 (or h_1 input) -> x
    cond_hidden: int = 128  # p(z_i | z_{i+1}) MLPs (chain) / g_i for i >= 2 (ladder)
    enc_hidden: list[int] = field(default_factory=lambda: [512, 256])  # x -> h_1
    ebm_hidden: list[int] = field(default_factory=lambda: [200, 100])
    ebm_spectral_norm: bool = True
    obs_sigma: float = 0.3  # s in p(x|z) = N(g(z), s^2 I), x in [-1, 1]
    min_cond_sigma: float = 0.01

    def validate(self) -> None:
        _choice("model.data_kind", self.data_kind, DATA_KINDS)
        _choice("model.backbone", self.backbone, BACKBONES)
        _choice("model.channels", self.channels, CHANNELS)
        if self.data_kind == "vector":
            _whole("model.vector_dim", self.vector_dim, 0, " (0: from the data)")
            if self.backbone != "mlp":
                raise ConfigError("model.backbone must be 'mlp' for vector data (conv needs images)")
        if self.backbone == "conv" and self.image_size not in CONV_IMAGE_SIZES:
            raise ConfigError(
                f"model.image_size {self.image_size} is not supported by the conv backbone; "
                f"supported: {', '.join(map(str, CONV_IMAGE_SIZES))}"
            )
        _choice("model.generator", self.generator, GENERATOR_KINDS)
        _choice("model.prior", self.prior, PRIOR_KINDS)
        if not self.z_dims or any(int(d) < 1 for d in self.z_dims):
            raise ConfigError(f"model.z_dims must be a non-empty list of positive sizes, got {self.z_dims}")
        for name in ("conv_channels", "obs_sigma", "image_size"):
            _positive(f"model.{name}", getattr(self, name))
        for name in ("gen_hidden", "enc_hidden", "ebm_hidden"):
            if any(int(h) < 1 for h in getattr(self, name)):
                raise ConfigError(f"model.{name} sizes must be positive, got {getattr(self, name)}")

    @property
    def n_layers(self) -> int:
        return len(self.z_dims)

    @property
    def is_vector(self) -> bool:
        return self.data_kind == "vector"

    @property
    def data_shape(self) -> tuple[int, ...]:
        """One input's shape as users hand it in: (d,), (H, W) or (H, W, C)."""
        if self.is_vector:
            return (int(self.vector_dim),)
        if self.channels == 1:
            return (self.image_size, self.image_size)
        return (self.image_size, self.image_size, self.channels)

    @property
    def data_dim(self) -> int:
        """D: the length of one flattened input (pixels in H, W, C order, or features)."""
        return math.prod(self.data_shape)


@dataclass
class LangevinConfig:
    steps: int = 40
    step_size: float = 0.1  # d in z <- z + d^2/2 grad log p + d eps (not the observation noise s)
    noise: bool = True

    def validate(self, where: str) -> None:
        _whole(f"{where}.steps", self.steps, 0)
        _positive(f"{where}.step_size", self.step_size)


# train.max_recon_rise for images under scheme mle when the config leaves it unset (nats per data dimension)
MLE_RECON_RISE = 0.02


@dataclass
class TrainConfig:
    scheme: str = "variational"  # variational | mle
    epochs: int = 12
    # at least this many optimiser steps: on a small data set (a few hundred vectors) the number of
    # epochs is raised to reach it, so that one config serves tables of any length (0 = off)
    min_steps: int = 0
    batch_size: int = 100
    lr_ebm: float = 2e-5
    lr_gen: float = 3e-4  # generator (and p(z_i | z_{i+1}))
    lr_enc: float = 3e-4  # inference network
    grad_clip: float = 10.0
    ebm_l2: float = 0.01  # penalty on f^2 at posterior and prior samples, keeps the energy scale bounded
    prior_langevin: LangevinConfig = field(default_factory=LangevinConfig)
    posterior_langevin: LangevinConfig = field(
        default_factory=lambda: LangevinConfig(steps=20, step_size=0.05, noise=True)
    )
    mle_init_from_encoder: bool = True
    val_fraction: float = 0.05
    max_train: int | None = None
    threads: int = 0  # torch intra-op threads while training (0: leave torch's setting); small models: 1
    # A batch loss above this in magnitude counts as divergence, like a NaN: training stops and the
    # last good checkpoint stays. Normal losses on 28x28 images stay within about 1e3; a runaway EBM
    # (seen with scheme mle) reaches 1e10 while staying finite.
    max_abs_loss: float = 1.0e8
    # The breakdown guard: an epoch whose held-in reconstruction error (at the encoder's mean codes) is more than this
    # many nats per data dimension above the best epoch's stops training; the best epoch becomes the model (0 = off; None
    # = MLE_RECON_RISE for images under scheme mle, else off). One mle fit's went 80 -> 104 in its last epoch, all finite.
    max_recon_rise: float | None = None
    sample_every: int = 2  # epochs between sample grids logged to MLflow
    # prior samples for the fit-end sample quality (FID in in-project LeNet features), logged to MLflow when the
    # training images have class labels; 0 = off
    sample_metrics: int = 10_000
    # prior Langevin steps of samples of a fitted model (`jebm-od sample`, the fit-end sample quality, sample grids); None
    # = prior_langevin.steps, which training always uses (a longer chain can give better samples: benchmarks/RESULTS.md)
    sample_steps: int | None = None
    # Each training image moved by its own random offset of up to this many pixels each way, edges repeated (0 = off)
    shifts: int = 0
    seed: int = 0

    @property
    def sampler_steps(self) -> int:
        """Prior Langevin steps for samples of the fitted model: ``sample_steps``, else the training value."""
        return self.prior_langevin.steps if self.sample_steps is None else self.sample_steps

    def validate(self) -> None:
        _choice("train.scheme", self.scheme, SCHEMES)
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _whole("train.threads", self.threads, 0, " (0: torch's own setting)")
        _whole("train.min_steps", self.min_steps, 0)
        _whole("train.shifts", self.shifts, 0, " (0: off)")
        if self.max_recon_rise is not None and self.max_recon_rise < 0:
            raise ConfigError(f"train.max_recon_rise must be >= 0 (0: off), got {self.max_recon_rise}")
        _whole("train.sample_metrics", self.sample_metrics, 0, " (0: off)")
        if self.sample_steps is not None and self.sample_steps < 0:
            raise ConfigError(f"train.sample_steps must be >= 0 (or null: the training value), got {self.sample_steps}")
        for name in ("lr_ebm", "lr_gen", "lr_enc", "grad_clip", "max_abs_loss"):
            _positive(f"train.{name}", getattr(self, name))
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"train.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        self.prior_langevin.validate("train.prior_langevin")
        self.posterior_langevin.validate("train.posterior_langevin")


@dataclass
class ScoreConfig:
    steps: int = 0  # K posterior Langevin steps at scoring time (0 = inference network only)
    step_size: float = 0.05
    noise: bool = False
    chains: int = 1
    false_alarm_rate: float = 0.05
    # Images per scoring batch: 1 000 was 1.06x faster than 500 at K = 0 and at K = 10 on
    # 2 cores with the fused kNN kernel (fewer per-batch overheads; benchmarks/RESULTS.md).
    batch_size: int = 1000
    # Hierarchical likelihood ratios (Havtorn et al. 2021): prior draws of the lower layers per
    # input for the llr_gt<k> components (0 = not computed; each draw costs one decoder pass).
    llr_samples: int = 0
    # Training images whose posterior means the latent_knn components search (0 = all of them).
    # More is better for detection and slower: on MNIST every training image (about 48 000)
    # against 10 000 raised AUPRC by 0.04 on average (benchmarks/RESULTS.md).
    reference_size: int = 60_000
    # latent_knn_top / latent_knn_cos_top: the kNN searches in the top latent layer alone. Off: on
    # MNIST they did not help any score (benchmarks/RESULTS.md, issue 14) and cost ~20 % of K = 0 speed.
    top_knn: bool = False
    # Neighbours averaged by every latent_knn search (PyOD's KNN also defaults to 5).
    knn_k: int = 5
    # The posterior width's one-sided term: max(z - width_margin, 0) of the robust z-score of
    # ``posterior_width`` is added to the score, so that only an unusually wide posterior counts
    # (None = off; configs/mnist.yaml sets 2: benchmarks/RESULTS.md, issue 14, "the posterior width as a
    # one-sided term").
    width_margin: float | None = None
    # Test-time shifts (images): latent_knn and latent_knn_cos (not the _top pair) are each the smallest over the image
    # and its copies moved this many pixels up, down, left and right (0 = off; 5 encodings per image: RESULTS.md).
    shifts: int = 0

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"score.steps must be >= 0, got {self.steps}")
        _whole("score.llr_samples", self.llr_samples, 0)
        _whole("score.reference_size", self.reference_size, 0, " (0 = every training image)")
        _positive("score.step_size", self.step_size)
        _positive("score.chains", self.chains)
        _whole("score.knn_k", self.knn_k, 1)
        _whole("score.shifts", self.shifts, 0, " (0: off)")
        if self.width_margin is not None and (
            isinstance(self.width_margin, bool)
            or not isinstance(self.width_margin, (int, float))
            or not math.isfinite(self.width_margin)
        ):
            raise ConfigError(f"score.width_margin must be a finite number or null (off), got {self.width_margin!r}")
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ConfigError(f"score.false_alarm_rate must be in (0, 1), got {self.false_alarm_rate}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def __post_init__(self) -> None:
        self.model.validate()
        self.train.validate()
        self.score.validate()
        for name, moves in (("train.shifts", self.train.shifts), ("score.shifts", self.score.shifts)):
            if moves and (self.model.is_vector or 2 * moves >= self.model.image_size):
                why = "is for images, not vectors" if self.model.is_vector else "must be under half the image's size"
                raise ConfigError(f"{name} {why}, got {moves}")

    @property
    def recon_rise_guard(self) -> float:
        """``train.max_recon_rise`` in effect: as set, else MLE_RECON_RISE for images under scheme mle, else 0 (off)."""
        if self.train.max_recon_rise is not None:
            return self.train.max_recon_rise
        return MLE_RECON_RISE if self.train.scheme == "mle" and not self.model.is_vector else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, one per section (what ``from_dict`` reads back)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """``to_dict`` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Config":
        """A validated config from nested dicts; missing sections and fields take their defaults.

        Parameters
        ----------
        data : dict or None
            ``{"model": {...}, "train": {...}, "score": {...}}``.

        Returns
        -------
        Config

        Raises
        ------
        ConfigError
            Naming an unknown field or a value out of range.
        """
        data = data or {}
        _no_unknown("", data, {"model", "train", "score"})
        train = dict(data.get("train") or {})
        for key in ("prior_langevin", "posterior_langevin"):
            if key in train:
                train[key] = _build(LangevinConfig, f"train.{key}", train[key])
        return cls(
            model=_build(ModelConfig, "model", data.get("model") or {}),
            train=_build(TrainConfig, "train", train),
            score=_build(ScoreConfig, "score", data.get("score") or {}),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        """A validated config from a YAML file (``configs/*.yaml``): safe YAML, each key at most once per mapping.

        Parameters
        ----------
        path : str or Path

        Returns
        -------
        Config

        Raises
        ------
        ConfigError
            Naming the file, and the field where one is wrong.
        """
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def override(self, values: dict[str, Any]) -> "Config":
        """A validated copy of the config with dotted paths replaced.

        Every override in the project (command-line options, benchmark variants, ``--set``) comes
        through here, so each is checked the same way.

        Parameters
        ----------
        values : dict
            Dotted paths to new values, e.g. ``{"score.steps": 10, "train.prior_langevin.steps": 60}``.

        Returns
        -------
        Config
            A new config; this one is unchanged.

        Raises
        ------
        ConfigError
            For an unknown path, or a value the config refuses (``score.steps = -3``).
        """
        data = self.to_dict()
        for path, value in values.items():
            node = data
            parts = path.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config path {path!r}")
                node = node[part]
            if parts[-1] not in node or isinstance(node[parts[-1]], dict):
                raise ConfigError(f"unknown config field {path!r}")
            node[parts[-1]] = value
        try:
            return Config.from_dict(data)
        except TypeError as exc:
            raise ConfigError(f"overrides {values}: {exc}") from None

    def with_overrides(self, **sections: dict[str, Any]) -> "Config":
        """``override`` by section, skipping values that are None (an option that was not given).

        Parameters
        ----------
        **sections : dict
            Section name to field values, e.g. ``with_overrides(train={"epochs": 2, "seed": None})``.

        Returns
        -------
        Config
        """
        return self.override(
            {
                f"{section}.{key}": v
                for section, values in sections.items()
                for key, v in values.items()
                if v is not None
            }
        )


def default_config_path(data_kind: str = "image", image_size: int | None = None) -> Path:
    """The packaged default config.

    ``vectors.yaml`` for feature vectors; ``mnist.yaml`` (the conv backbone) for images, or
    ``mnist-mlp.yaml`` (the same latents, prior and score on the MLP backbone) when ``image_size`` is given and the conv
    backbone does not support it (it supports 28, 32 and 64 pixels).
    """
    _choice("data kind", data_kind, DATA_KINDS)
    if data_kind == "vector":
        name = "vectors.yaml"
    elif image_size is not None and int(image_size) not in CONV_IMAGE_SIZES:
        name = "mnist-mlp.yaml"
    else:
        name = "mnist.yaml"
    return Path(__file__).parent / "configs" / name


def for_vectors(config: Config, n_features: int) -> Config:
    """``config`` made to model vectors of ``n_features`` features (the data decides the data kind)."""
    if config.model.backbone != "mlp":
        raise ConfigError(f"model.backbone {config.model.backbone!r} needs images; vectors use the mlp backbone")
    return config.with_overrides(model={"data_kind": "vector", "vector_dim": int(n_features)})


def _build(cls, where: str, values: Any):
    if not isinstance(values, dict):
        if dataclasses.is_dataclass(values):
            return values
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    _no_unknown(where, values, names)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(f"{where}.{name}", value, hints[name])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_type(name: str, value: Any, hint: Any) -> None:
    """A ConfigError naming the field when ``value`` is not of the field's type (an int is a float too)."""
    if _is(value, hint):
        return
    hint_text = ""
    if isinstance(value, str):
        try:
            float(value)
            hint_text = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-3, or as 0.001)"
        except ValueError:
            pass
    raise ConfigError(f"{name} must be {_describe(hint)}, got {value!r}{hint_text}")


def _is(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_is(value, h) for h in hint.__args__)
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_is(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join("null" if h is type(None) else _describe(h) for h in hint.__args__)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)} section")


def _no_unknown(where: str, values: dict, allowed: set[str]) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field(s) {', '.join(prefix + u for u in unknown)}; allowed: {sorted(allowed)}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _whole(name: str, value, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}{note}, got {value!r}")


def _positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
