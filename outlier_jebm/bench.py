"""The benchmark: jebm models and PyOD detectors on the same hold-out splits, one metric code path.

For every held-out digit D and seed s, ``prepare_data(data, holdout=D, seed=s)`` makes one split
that every detector sees:

- PyOD detectors fit on the whole training part (train + held-in validation, the protocol's
  80 %) and score the test part. Their input is the image pixels in [0, 1], flattened, with no
  further scaling; where PyOD's own defaults are unsound on pixels the registry below says what
  was changed and why.
- jebm models train through ``pipeline.run_fit`` (the ``fit`` command's code path: training on
  the train part, calibration on the validation part) and score through ``Scorer``.
  A model gives one row for its default score and, from the same fit and the same scoring pass,
  one row per score component (``jebm[latent_knn]``).

Every row's AUPRC and AUROC come from ``evaluate.detection_metrics``. ``fit_seconds`` is the
wall time of ``fit(X)`` (PyOD) or of ``run_fit`` without MLflow logging (jebm: training and
calibration); ``score_images_per_second`` is the test set's size over the wall time of one
scoring pass. Results are written after every cell, so a stopped run keeps what it did.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .config import Config, ConfigError, for_vectors
from .evaluate import detection_metrics
from .fileio import atomic_path, write_text_atomic

# Cui, Wu and Han, ICCV 2023 (the joint latent EBM paper), Table 3: AUPRC, MNIST hold-out-one-digit.
# The papers score with log p(x, z) and average over their last 10 training epochs.
PUBLISHED_AUPRC: dict[str, dict[int, float]] = {
    "joint latent EBM (published)": {1: 0.722, 4: 0.949, 5: 0.980, 7: 0.941, 9: 0.935},
    "HVAE (published)": {1: 0.494, 4: 0.920, 5: 0.913, 7: 0.680, 9: 0.791},
    "LEBM (published)": {1: 0.336, 4: 0.630, 5: 0.619, 7: 0.463, 9: 0.413},
}

PIXEL_INPUT = "image pixels in [0, 1], flattened to H*W features, no further scaling"
VECTOR_INPUT = (
    "feature vectors standardised with the mean and std of the training part (train + held-in "
    "validation), the same input for every PyOD detector; jebm standardises its own training part"
)

COLUMNS = [
    "detector",
    "holdout",
    "seed",
    "split",
    "test_in_train",
    "status",
    "auprc",
    "auroc",
    "fit_seconds",
    "score_images_per_second",
    "sample_fid_lenet",
    "sample_confidence",
    "n_train",
    "n_test",
    "anomaly_rate",
    "nonfinite_scores",
    "family",
    "model",
    "score",
    "mlflow_run_id",
    "note",
]

SKIPPED_BUDGET = "skipped: time budget"

# short names for config paths in jebm variants (``jebm:prior=gaussian``); full dotted paths work too
SHORTHANDS = {
    "prior": "model.prior",
    "generator": "model.generator",
    "z_dims": "model.z_dims",
    "scheme": "train.scheme",
    "epochs": "train.epochs",
    "prior_steps": "train.prior_langevin.steps",
    "posterior_steps": "train.posterior_langevin.steps",
    "steps": "score.steps",  # K posterior steps at scoring time, as `jebm-od score --steps`
}


class BenchError(ValueError):
    """A benchmark request that cannot run as written (unknown detector, bad override, ...)."""


@dataclass(frozen=True)
class PyODDetector:
    """One PyOD detector as the benchmark runs it: class, settings and the reason for each change."""

    name: str
    cls_path: str  # "pyod.models.knn.KNN"
    settings: dict[str, Any]  # constructor arguments that differ from PyOD's defaults
    why: str
    seeded: bool = False  # takes random_state=seed
    needs_n_features: bool = False

    def build(self, seed: int, n_features: int):
        module, cls = self.cls_path.rsplit(".", 1)
        kwargs = dict(self.settings)
        if self.seeded:
            kwargs["random_state"] = seed
        if self.needs_n_features:
            kwargs["n_features"] = n_features
        return getattr(importlib.import_module(module), cls)(**kwargs)

    def describe(self, seed: int = 0, n_features: int = 784) -> dict[str, Any]:
        """Every constructor argument (defaults included), the input scaling and the reasons."""
        params = {k: _plain(v) for k, v in self.build(seed, n_features).get_params().items()}
        return {
            "family": "pyod",
            "class": self.cls_path,
            "changed_from_defaults": dict(self.settings),
            "params": params,
            "input": PIXEL_INPUT,
            "why": self.why,
        }


_DEFAULTS = "PyOD's defaults (contamination only sets PyOD's own threshold, which is not used here)."
_DEEP = (
    "10 epochs for every deep detector (AutoEncoder's default; VAE's is 30 and DeepSVDD's 100), an equal "
    "and bounded CPU budget; preprocessing off: PyOD's StandardScaler divides near-constant border "
    "pixels by a near-zero spread and blows their noise up, while [0, 1] pixels are already well "
    "scaled for a network; verbose off (no progress bars in the log)."
)

PYOD_DETECTORS: dict[str, PyODDetector] = {
    d.name: d
    for d in [
        PyODDetector(
            "knn", "pyod.models.knn.KNN", {}, _DEFAULTS + " Score: distance to the 5th nearest training image."
        ),
        PyODDetector("lof", "pyod.models.lof.LOF", {}, _DEFAULTS),
        PyODDetector(
            "iforest", "pyod.models.iforest.IForest", {}, _DEFAULTS + " random_state = the split's seed.", seeded=True
        ),
        PyODDetector("ecod", "pyod.models.ecod.ECOD", {}, _DEFAULTS),
        PyODDetector("copod", "pyod.models.copod.COPOD", {}, _DEFAULTS),
        PyODDetector("hbos", "pyod.models.hbos.HBOS", {}, _DEFAULTS),
        PyODDetector("loda", "pyod.models.loda.LODA", {}, _DEFAULTS + " random_state = the split's seed.", seeded=True),
        PyODDetector(
            "pca",
            "pyod.models.pca.PCA",
            {"n_components": 0.95, "svd_solver": "full", "standardization": False},
            "PyOD's defaults keep every component and divide by each one's explained variance; on pixels the "
            "last components have (near) zero variance and every score is infinite (the tests "
            "reproduce it on 8x8 digits). Kept: the components that explain 95 % of the training variance "
            "(svd_solver 'full' is what a variance fraction needs). Standardisation off: all pixels share one "
            "unit, and standardising near-constant border pixels amplifies their noise.",
        ),
        PyODDetector(
            "autoencoder",
            "pyod.models.auto_encoder.AutoEncoder",
            {"epoch_num": 10, "preprocessing": False, "verbose": 0},
            _DEEP,
            seeded=True,
        ),
        PyODDetector(
            "vae", "pyod.models.vae.VAE", {"epoch_num": 10, "preprocessing": False, "verbose": 0}, _DEEP, seeded=True
        ),
        PyODDetector(
            "deepsvdd",
            "pyod.models.deep_svdd.DeepSVDD",
            {"epochs": 10, "preprocessing": False, "verbose": 0},
            _DEEP,
            seeded=True,
            needs_n_features=True,
        ),
    ]
}


def pixel_features(images01: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) images in [0, 1] -> (N, H*W*C) float32: the PyOD detectors' input."""
    return np.ascontiguousarray(images01.reshape(len(images01), -1), dtype=np.float32)


def is_vector_split(td) -> bool:
    """Vectors come as (n, d), images as (n, H, W) or (n, H, W, C)."""
    return td.train.ndim == 2


def pyod_inputs(td) -> tuple[np.ndarray, np.ndarray]:
    """The PyOD detectors' training and test input for one split (``PIXEL_INPUT`` or ``VECTOR_INPUT``)."""
    X = pixel_features(np.concatenate([td.train, td.val]))  # the protocol's whole 80 %
    T = pixel_features(td.test)
    if is_vector_split(td):
        mean, std = X.mean(0), X.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        X, T = (X - mean) / std, (T - mean) / std
    return X, T


@dataclass
class JEBMVariant:
    """A jebm configuration in the benchmark: the base config plus overrides, and its component rows."""

    name: str
    overrides: dict[str, Any]
    config: Config
    components: list[str] | None = None  # None: every component that is not constant on the test set

    def describe(self) -> dict[str, Any]:
        return {
            "family": "jebm",
            "overrides": self.overrides,
            "config": self.config.to_dict(),
            "components": self.components or "all (constant ones left out)",
            "input": (
                "feature vectors, standardised inside the model (model.standardize)"
                if self.config.model.is_vector
                else "image pixels in [0, 1], scaled to [-1, 1] inside the model"
            ),
        }


def parse_overrides(text: str, sep: str = ",") -> dict[str, Any]:
    """``"prior=gaussian,train.prior_langevin.steps=60"`` -> {"model.prior": "gaussian", ...}.

    Keys are dotted config paths or a name in ``SHORTHANDS``; values are read as YAML scalars or
    lists (``z_dims=[8,4]``).
    """
    out: dict[str, Any] = {}
    for item in _split_top(text, sep):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise BenchError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise BenchError(f"override {item!r}: value is not readable") from None
        out[SHORTHANDS.get(key, key)] = parsed
    return out


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """``Config.override``, its errors worded for the benchmark's command line (with the shorthands)."""
    try:
        return config.override(overrides)
    except ConfigError as exc:
        raise BenchError(f"{exc} (shorthands: {', '.join(SHORTHANDS)})") from None


def parse_detectors(
    text: str,
    base: Config,
    *,
    variants: dict[str, str] | None = None,
    components: str = "all",
) -> list[PyODDetector | JEBMVariant]:
    """Turn ``--detectors`` (and ``--jebm-variant NAME=OVERRIDES``) into an ordered list of detectors.

    Tokens, separated by commas: a PyOD name (``PYOD_DETECTORS``); ``jebm`` (the base config);
    ``jebm:key=value:key=value`` (the base config with overrides); a name defined with
    ``variants``; any jebm token followed by ``[comp+comp]`` to report those components. Named
    variants that ``text`` does not mention run after the listed detectors. ``components`` is
    ``all``, ``none`` or a comma list reported for every jebm model.
    """
    variants = dict(variants or {})
    for name in variants:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in PYOD_DETECTORS or name == "jebm":
            raise BenchError(
                f"jebm variant name {name!r}: use letters, digits, '_', '-', '.', and not a detector's name"
            )
    tokens = [t.strip() for t in _split_top(text, ",") if t.strip()]
    mentioned = {_split_components(t)[0] for t in tokens}
    tokens += [name for name in variants if name not in mentioned]
    if not tokens:
        raise BenchError("no detectors given")

    if components.strip().lower() in ("all", ""):
        every: list[str] | None = None
    elif components.strip().lower() == "none":
        every = []
    else:
        every = [c.strip() for c in components.split(",") if c.strip()]

    entries: list[PyODDetector | JEBMVariant] = []
    by_name: dict[str, JEBMVariant] = {}
    for token in tokens:
        name, picked = _split_components(token)
        if name in PYOD_DETECTORS:
            if picked:
                raise BenchError(f"detector {token!r}: components belong to jebm models only")
            if name not in {e.name for e in entries}:
                entries.append(PYOD_DETECTORS[name])
            continue
        if name not in by_name:
            if name == "jebm":
                overrides: dict[str, Any] = {}
            elif name.startswith("jebm:"):
                overrides = parse_overrides(name[len("jebm:") :], sep=":")
            elif name in variants:
                overrides = parse_overrides(variants[name], sep=",")
            else:
                known = ", ".join(["jebm", "jebm:key=value", *PYOD_DETECTORS, *variants])
                raise BenchError(f"unknown detector {name!r}; known: {known}")
            config = apply_overrides(base, overrides)
            for path in ("model.image_size", "train.val_fraction"):
                if _get(config, path) != _get(base, path):
                    raise BenchError(
                        f"detector {name!r}: {path} must stay as in the base config (every detector shares one split)"
                    )
            variant = JEBMVariant(name, overrides, config, None if every is None else list(every))
            by_name[name] = variant
            entries.append(variant)
        variant = by_name[name]
        if variant.components is not None:
            variant.components += [c for c in picked if c not in variant.components]

    known_components = set()
    for entry in entries:
        if isinstance(entry, JEBMVariant):
            available = _available_components(entry.config)
            known_components |= available
            if entry.components is not None:
                missing = [c for c in entry.components if c not in available and c not in (every or [])]
                if missing:
                    raise BenchError(f"{entry.name}: no component(s) {missing}; available: {sorted(available)}")
                entry.components = [c for c in entry.components if c in available]
    unknown = [c for c in (every or []) if c not in known_components]
    if unknown and known_components:
        raise BenchError(f"--components: unknown {unknown}; available: {sorted(known_components)}")
    return entries


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BenchError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise BenchError(f"{what}: nothing given")
    return list(dict.fromkeys(values))


def parse_seconds(text: str | None) -> float | None:
    """``"3600"``, ``"90s"``, ``"30m"``, ``"1.5h"`` -> seconds; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text).lower())
    if m is None:
        raise BenchError(f"time budget {text!r}: expected seconds, or a number with s, m or h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class BenchSpec:
    data: str
    holdouts: list[int]
    seeds: list[int]
    detectors: list[PyODDetector | JEBMVariant]
    base_config: Config
    out_dir: Path
    time_budget: float | None = None  # seconds for the whole run; cells not started in time are skipped
    max_train: int | None = None
    data_dir: str | Path | None = None
    device: str = "auto"
    tracking_uri: str | None = None
    track: bool = True
    command: str = ""
    split: str = "clean"  # or "published" (splits.py): the papers' loaders' MNIST split; "clean,published": both

    @property
    def splits(self) -> list[str]:
        """The splits to run, in order (``split`` is one name or a comma-separated list)."""
        from .splits import SPLITS

        names = [t.strip() for t in self.split.split(",") if t.strip()] or ["clean"]
        for name in names:
            if name not in SPLITS:
                raise BenchError(f"split {name!r}: expected {' or '.join(SPLITS)} (or a comma-separated list)")
        if "published" in names and self.data.strip().lower() != "mnist":
            raise BenchError("the published split is MNIST's hold-out protocol: it needs --data mnist")
        return list(dict.fromkeys(names))


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    out_dir: Path
    seconds: float
    figures: list[Path] = field(default_factory=list)


RowHook = Callable[[dict[str, Any]], None]
MessageHook = Callable[[str], None]
CellHook = Callable[[int, int, str], None]  # (cells done, cells in all, what runs next)


def run_bench(
    spec: BenchSpec,
    *,
    on_row: RowHook | None = None,
    on_message: MessageHook | None = None,
    on_cell: CellHook | None = None,
) -> BenchResult:
    """Run every (holdout, seed, detector) cell; write results.csv, results.md, settings.json and figures."""
    from .pipeline import prepare_data

    say = on_message or (lambda _m: None)
    t0 = time.perf_counter()
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(spec)
    _write_json(out / "settings.json", settings)
    rows: list[dict[str, Any]] = []
    figures: list[Path] = []
    splits = spec.splits
    total = len(splits) * len(spec.holdouts) * len(spec.seeds) * len(spec.detectors)
    done = 0
    budget_start = time.perf_counter()  # the budget is for the cells (data loading included), not the set-up

    def emit(row: dict[str, Any]) -> None:
        row["split"] = split
        row["test_in_train"] = td.test_in_train if td is not None else ""
        rows.append(row)
        write_csv(out / "results.csv", rows)
        (out / "results.md").write_text(render_markdown(rows, spec, settings))
        if on_row is not None:
            on_row(row)

    def over_budget() -> bool:
        return spec.time_budget is not None and time.perf_counter() - budget_start >= spec.time_budget

    for split, holdout in ((sp, h) for sp in splits for h in spec.holdouts):
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for seed in spec.seeds:
            td = None
            for det in spec.detectors:
                if on_cell is not None:
                    on_cell(
                        done,
                        total,
                        f"holdout {holdout} seed {seed} {det.name}" + (f" ({split} split)" if len(splits) > 1 else ""),
                    )
                if over_budget():
                    for row in _skipped_rows(det, holdout, seed):
                        emit(row)
                    done += 1
                    continue
                if td is None:
                    td = prepare_data(
                        spec.data,
                        holdout=holdout,
                        seed=seed,
                        val_fraction=spec.base_config.train.val_fraction,
                        max_train=spec.max_train,
                        image_size=spec.base_config.model.image_size,
                        data_dir=spec.data_dir,
                        channels=spec.base_config.model.channels,
                        data_kind=spec.base_config.model.data_kind,
                        split=split,
                    )
                    unit = "vectors" if is_vector_split(td) else "images"
                    say(
                        f"holdout {holdout} seed {seed}: {len(td.train) + len(td.val)} training {unit} "
                        f"({len(td.val)} of them held in for jebm's calibration), {len(td.test)} test {unit}, "
                        f"{100 * float(np.mean(td.test_is_anomaly)):.1f} % anomalies"
                    )
                try:
                    if isinstance(det, JEBMVariant):
                        cell = _jebm_cell(det, td, holdout, seed, spec, say, split)
                    else:
                        cell = _pyod_cell(det, td, seed)
                except Exception as exc:  # one broken detector must not lose the others' rows
                    cell = [_failed_row(det, holdout, seed, exc)]
                for row, scores, params, extra in cell:
                    row["split"] = split  # before MLflow sees the row
                    if spec.track:
                        try:
                            row["mlflow_run_id"] = _log_cell(spec, row, params, extra, td, scores)
                        except Exception as exc:  # the row is measured: keep it even if MLflow is unreachable
                            row["note"] = "; ".join(filter(None, [row["note"], f"MLflow logging failed: {exc}"]))
                            say(f"MLflow logging failed for {row['detector']}: {exc}")
                    whole_score = not row["score"].startswith("component")
                    if scores is not None and row["status"] == "ok" and seed == spec.seeds[0] and whole_score:
                        curves[row["detector"]] = (td.test_is_anomaly, scores)
                    emit(row)
                done += 1
        if curves:
            import matplotlib.pyplot as plt

            tag = "" if split == "clean" else f"-{split}"
            path = out / f"pr_holdout{holdout}{tag}.png"
            fig = pr_figure(curves, f"holdout {holdout}, seed {spec.seeds[0]}" + (f", {split} split" if tag else ""))
            fig.savefig(path, dpi=120)
            plt.close(fig)
            figures.append(path)
    if on_cell is not None:
        on_cell(done, total, "done")
    settings["finished"] = _now()
    settings["wall_seconds"] = time.perf_counter() - t0
    _write_json(out / "settings.json", settings)
    return BenchResult(rows=rows, out_dir=out, seconds=time.perf_counter() - t0, figures=figures)


# a cell yields (row, test scores or None, params to log, extra metrics to log)
CellRows = list[tuple[dict[str, Any], np.ndarray | None, dict[str, Any], dict[str, Any]]]


_WARMED: set[str] = set()


def _pyod_cell(det: PyODDetector, td, seed: int) -> CellRows:
    X, T = pyod_inputs(td)
    if det.name not in _WARMED:
        # one untimed fit on a few images first, so that fit_seconds leaves out one-off costs of the
        # process (lazy imports, numba compilation: HBOS's first fit on 8x8 digits took 5 s, its second 0.02 s)
        det.build(seed, X.shape[1]).fit(X[: min(len(X), 128)])
        _WARMED.add(det.name)
    model = det.build(seed, X.shape[1])
    t = time.perf_counter()
    model.fit(X)
    fit_seconds = time.perf_counter() - t
    t = time.perf_counter()
    scores = np.asarray(model.decision_function(T), dtype=np.float64)
    score_seconds = time.perf_counter() - t
    row = _scored_row(det.name, det.name, "score", "pyod", td, seed, scores, fit_seconds, score_seconds)
    return [(row, scores, det.describe(seed, X.shape[1]), {})]


def _jebm_cell(
    variant: JEBMVariant, td, holdout: int, seed: int, spec: BenchSpec, say: MessageHook, split: str = "clean"
) -> CellRows:
    from .checkpoint import load_model
    from .pipeline import run_fit
    from .scoring import Scorer
    from .train import planned_epochs, resolve_device

    cfg = variant.config.with_overrides(train={"seed": seed, "max_train": spec.max_train})
    if is_vector_split(td):
        cfg = for_vectors(cfg, td.train.shape[1])
    tag = "" if split == "clean" else f"-{split}"
    model_dir = Path(spec.out_dir) / "models" / f"{_slug(variant.name)}-holdout{holdout}-seed{seed}{tag}"
    n_epochs = planned_epochs(cfg, len(td.train))  # run_fit raises the epochs of a small set to train.min_steps

    def on_epoch_end(epoch: int, m: dict[str, float]) -> None:
        say(
            f"  {variant.name} holdout {holdout} seed {seed}: epoch {epoch + 1}/{n_epochs}  loss {m['loss']:.1f}  "
            f"recon {m['recon']:.1f}  {m['images_per_second']:.0f} img/s  {m['seconds_per_epoch']:.0f} s"
        )

    t = time.perf_counter()
    summary = run_fit(
        cfg, td, out_dir=model_dir, device=spec.device, track=False, remember=False, on_epoch_end=on_epoch_end
    )
    fit_seconds = time.perf_counter() - t
    if summary.sample_quality is not None:  # fit_seconds is training + calibration, as for every jebm row
        fit_seconds -= summary.sample_quality["seconds"]
    device = resolve_device(spec.device)
    scorer = Scorer(load_model(model_dir, device=device), device=device)
    t = time.perf_counter()
    table = scorer.score(td.test)
    score_seconds = time.perf_counter() - t

    train_seconds = sum(h.get("seconds_per_epoch", 0.0) for h in summary.history)
    note = f"training {train_seconds:.1f} s of the fit; model {model_dir}"
    params = {**variant.describe(), "config": cfg.to_dict(), "model_dir": str(model_dir)}
    extra = {"history": summary.history}
    row = _scored_row(
        variant.name, variant.name, "score", "jebm", td, seed, table["score"], fit_seconds, score_seconds, note=note
    )
    if summary.sample_quality is not None:
        row["sample_fid_lenet"] = summary.sample_quality["fid_lenet"]
        row["sample_confidence"] = summary.sample_quality["lenet_confidence"]
    out: CellRows = [(row, table["score"], params, extra)]
    names = scorer.component_names
    chosen = (
        variant.components
        if variant.components is not None
        else [n for n in names if np.ptp(np.asarray(table[n], dtype=np.float64)) > 0]
    )
    for name in chosen:
        values = np.asarray(table[name], dtype=np.float64)
        note = "component alone, same fit and scoring pass as " + variant.name
        if np.ptp(values) == 0:
            note += "; constant on the test set"
        row = _scored_row(
            f"{variant.name}[{name}]",
            variant.name,
            f"component:{name}",
            "jebm",
            td,
            seed,
            values,
            fit_seconds,
            score_seconds,
            note=note,
        )
        out.append((row, values, {**params, "component": name}, {}))
    return out


def _base_row(detector: str, model: str, score: str, family: str, holdout: int, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(detector=detector, model=model, score=score, family=family, holdout=int(holdout), seed=int(seed))
    return row


def _scored_row(
    detector: str,
    model: str,
    score: str,
    family: str,
    td,
    seed: int,
    scores: np.ndarray,
    fit_seconds: float,
    score_seconds: float,
    note: str = "",
) -> dict[str, Any]:
    scores = np.asarray(scores, dtype=np.float64)
    y = td.test_is_anomaly
    if len(scores) != len(y):
        raise RuntimeError(f"{detector} returned {len(scores)} scores for {len(y)} test images")
    nonfinite = int((~np.isfinite(scores)).sum())
    row = _base_row(detector, model, score, family, td.holdout, seed)
    row.update(detection_metrics(y, scores))
    row.update(
        status="ok",
        fit_seconds=fit_seconds,
        score_images_per_second=len(y) / max(score_seconds, 1e-9),
        n_train=len(td.train) + len(td.val),
        n_test=len(y),
        anomaly_rate=float(np.mean(y)),
        nonfinite_scores=nonfinite,
        note=note,
    )
    if nonfinite:
        row["note"] = (note + "; " if note else "") + f"{nonfinite} non-finite scores"
    return row


def _skipped_rows(det: PyODDetector | JEBMVariant, holdout: int, seed: int) -> list[dict[str, Any]]:
    family = "jebm" if isinstance(det, JEBMVariant) else "pyod"
    rows = [_base_row(det.name, det.name, "score", family, holdout, seed)]
    if isinstance(det, JEBMVariant):
        rows += [
            _base_row(f"{det.name}[{c}]", det.name, f"component:{c}", family, holdout, seed)
            for c in (det.components or [])
        ]
    for row in rows:
        row["status"] = SKIPPED_BUDGET
    return rows


def _failed_row(det, holdout: int, seed: int, exc: Exception):
    family = "jebm" if isinstance(det, JEBMVariant) else "pyod"
    row = _base_row(det.name, det.name, "score", family, holdout, seed)
    message = " ".join(str(exc).split())[:300]
    row["status"] = f"failed: {type(exc).__name__}: {message}"
    if isinstance(det, JEBMVariant):
        params = det.describe()
    else:
        params = {"family": "pyod", "class": det.cls_path, "changed_from_defaults": dict(det.settings)}
    return row, None, params, {}


def _log_cell(
    spec: BenchSpec, row: dict[str, Any], params: dict[str, Any], extra: dict[str, Any], td, scores: np.ndarray | None
) -> str:
    """One MLflow run per row: tags, the detector's settings, metrics, and a PR curve for whole scores."""
    from .tracking import Tracker

    status = "FINISHED" if row["status"] == "ok" else "FAILED"
    split = row.get("split") or "clean"
    run_name = f"bench-{row['detector']}-holdout{row['holdout']}-seed{row['seed']}" + (
        "" if split == "clean" else f"-{split}"
    )
    with Tracker(spec.tracking_uri, run_name=run_name) as tr:
        tr.set_tags(
            {
                "job": "bench",
                "detector": row["detector"],
                "holdout": row["holdout"],
                "seed": row["seed"],
                "split": split,
                "family": row["family"],
                "model": row["model"],
                "score": row["score"],
                "data": spec.data,
                "status": row["status"],
            }
        )
        tr.log_params(
            {**{k: _plain(v) for k, v in params.items()}, "max_train": spec.max_train, "n_train": row["n_train"]}
        )
        tr.log_metrics(
            {
                k: row[k]
                for k in (
                    "auprc",
                    "auroc",
                    "fit_seconds",
                    "score_images_per_second",
                    "n_test",
                    "anomaly_rate",
                    "nonfinite_scores",
                )
                if row[k] != ""
            }
        )
        for epoch, metrics in enumerate(extra.get("history", [])):
            tr.log_metrics({f"fit.{k}": v for k, v in metrics.items() if _finite_number(v)}, step=epoch + 1)
        if scores is not None and not row["score"].startswith("component"):
            import matplotlib.pyplot as plt

            fig = pr_figure(
                {row["detector"]: (td.test_is_anomaly, scores)}, f"holdout {row['holdout']}, seed {row['seed']}"
            )
            tr.log_figure(fig, "pr_curve.png")
            plt.close(fig)
        if status != "FINISHED":
            tr.end(status)
        return tr.run_id


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows so far, written to a temporary file and moved into place (a stopped run keeps a whole file)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in COLUMNS})


def pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str):
    """Precision-recall curves of one or more detectors on one test set, AUPRC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    chance = None
    for name, (y, scores) in curves.items():
        s = np.nan_to_num(scores, nan=np.inf, posinf=np.finfo(np.float64).max, neginf=np.finfo(np.float64).min)
        p, r, _ = precision_recall_curve(y, s)
        auprc = detection_metrics(y, scores)["auprc"]
        ax.plot(r, p, lw=1.2, label=f"{name} ({auprc:.3f})")
        chance = float(np.mean(y))
    if chance is not None:
        ax.axhline(chance, ls="--", c="gray", lw=1, label=f"chance ({chance:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title=f"PR: {title}", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def row_label(row: dict[str, Any], several: bool) -> str:
    """The detector's name, with its split where the rows hold more than one (``several``): "jebm (published)"."""
    return f"{row['detector']} ({row.get('split') or 'clean'})" if several else row["detector"]


def _several_splits(rows: list[dict[str, Any]]) -> bool:
    return len({r.get("split") or "clean" for r in rows}) > 1


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """(detector label, holdout) -> mean / std over the seeds that ran, and how many did (``row_label``)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    several = _several_splits(rows)
    for row in rows:
        groups.setdefault((row_label(row, several), int(row["holdout"])), []).append(row)
    out = {}
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        entry: dict[str, Any] = {
            "n": len(group),
            "n_ok": len(ok),
            "status": group[0]["status"] if not ok else "ok",
            "family": group[0]["family"],
            "score": group[0]["score"],
            "split": group[0].get("split") or "clean",
        }
        for col in (
            "auprc",
            "auroc",
            "fit_seconds",
            "score_images_per_second",
            "anomaly_rate",
            "n_test",
            "sample_fid_lenet",
            "sample_confidence",
        ):
            values = np.array([float(r[col]) for r in ok if r.get(col, "") not in ("", None)], dtype=np.float64)
            entry[col] = float(values.mean()) if len(values) else None
            entry[col + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        out[key] = entry
    return out


def render_markdown(rows: list[dict[str, Any]], spec: BenchSpec, settings: dict[str, Any]) -> str:
    agg = aggregate(rows)
    several = _several_splits(rows)
    detectors = list(dict.fromkeys(row_label(r, several) for r in rows))
    holdouts = [h for h in spec.holdouts if any(int(r["holdout"]) == h for r in rows)]
    machine = settings["machine"]
    lines = [
        f"# jebm-od bench: {spec.data}, holdout {', '.join(map(str, spec.holdouts))}, "
        f"seed {', '.join(map(str, spec.seeds))}, {' and '.join(spec.splits)} split"
        + ("s (side by side: each detector's rows are labelled by split)" if len(spec.splits) > 1 else ""),
        "",
        f"Started {settings['started']}; {machine['cpu_count']} CPUs, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, {machine['platform']}; commit {machine['git_commit'] or 'unknown'}"
        + (" (with uncommitted changes)" if machine.get("git_dirty") else "")
        + ".",
    ]
    if spec.command:
        lines += ["", f"`{spec.command}`"]
    lines += [
        "",
        "Every detector saw the same split per (hold-out, seed). PyOD detectors: "
        + (VECTOR_INPUT if spec.base_config.model.is_vector else PIXEL_INPUT)
        + ", fitted on "
        "the whole training part; their settings and the reason for each change from PyOD's defaults are in "
        "`settings.json`. jebm: trained by `run_fit` (the `fit` command's code path, MLflow logging aside) "
        "and scored by `Scorer`; `name[component]` rows rank by one score component of the same fit. "
        "fit s: wall time of the fit (jebm: training + calibration); score img/s: test images over the "
        "wall time of one scoring pass. AUPRC with the anomaly as the positive class; chance = anomaly rate. "
        + (f"Values are mean ± std over {len(spec.seeds)} seeds." if len(spec.seeds) > 1 else ""),
        "",
    ]
    lines += _summary_table(agg, detectors, holdouts, spec)
    lines += [""] + _summary_table(agg, detectors, holdouts, spec, metric="auroc")
    lines += _sample_quality_table(agg, detectors, holdouts)
    for h in holdouts:
        lines += ["", f"## Holdout {h}", ""]
        for split in dict.fromkeys(e["split"] for (d, hh), e in agg.items() if hh == h):
            sized = [e for (d, hh), e in agg.items() if hh == h and e["split"] == split and e["n_test"] is not None]
            if sized:
                where = f" ({split} split)" if len(spec.splits) > 1 else ""
                lines += [
                    f"{int(sized[0]['n_test'])} test images{where}, chance AUPRC (anomaly rate) "
                    f"{sized[0]['anomaly_rate']:.3f}.",
                    "",
                ]
        # the best is marked per split: a published split's test normals are mostly training images
        best = {}
        for (d, hh), e in agg.items():
            if hh == h and e["auprc"] is not None:
                best[e["split"]] = max(best.get(e["split"], e["auprc"]), e["auprc"])
        lines += ["| detector | AUPRC | AUROC | fit s | score img/s | status |", "|" + " --- |" * 6]
        for d in detectors:
            e = agg.get((d, h))
            if e is None:
                continue
            auprc = _pm(e, "auprc")
            if e["auprc"] is not None and e["auprc"] == best.get(e["split"]):
                auprc = f"**{auprc}**"
            status = (
                e["status"]
                if e["n_ok"] == e["n"]
                else (f"{e['n_ok']} of {e['n']} seeds ran" if e["n_ok"] else e["status"])
            )
            lines.append(
                f"| {d} | {auprc} | {_pm(e, 'auroc')} | {_num(e['fit_seconds'], 1)} | "
                f"{_num(e['score_images_per_second'], 0)} | {status} |"
            )
    return "\n".join(lines) + "\n"


def _sample_quality_table(agg, detectors: list[str], holdouts: list[int]) -> list[str]:
    """FID (in-project LeNet features) and LeNet confidence of each jebm model's prior samples."""
    rows = []
    for d in detectors:
        cells = [agg.get((d, h)) for h in holdouts]
        if not any(e is not None and e.get("sample_fid_lenet") is not None for e in cells):
            continue
        rows.append(
            f"| {d} | "
            + " | ".join(
                "-"
                if e is None or e.get("sample_fid_lenet") is None
                else f"{_pm(e, 'sample_fid_lenet')} / {_num(e['sample_confidence'], 3)}"
                for e in cells
            )
            + " |"
        )
    if not rows:
        return []
    return [
        "",
        "## Sample quality: FID (in-project LeNet features) / LeNet confidence",
        "",
        "Prior samples (train.sample_metrics of them, 10 000 by default) against as many training images, in the "
        "penultimate features of a LeNet trained on the split's training part (sample_quality.py); lower FID is "
        "better. Not comparable with Inception FID. Left out of fit s.",
        "",
        "| | " + " | ".join(str(h) for h in holdouts) + " |",
        "| --- |" + " --- |" * len(holdouts),
    ] + rows


def _summary_table(agg, detectors: list[str], holdouts: list[int], spec: BenchSpec, metric: str = "auprc") -> list[str]:
    if not holdouts:
        return []
    head = [
        f"## Summary: {metric.upper()}",
        "",
        "| | " + " | ".join(str(h) for h in holdouts) + " |",
        "| --- |" + " --- |" * len(holdouts),
    ]
    body = []
    pyod = [d for d in detectors if any(agg.get((d, h), {}).get("family") == "pyod" for h in holdouts)]
    splits = list(dict.fromkeys(agg[(d, h)]["split"] for d in pyod for h in holdouts if (d, h) in agg))
    for split in splits:
        cells = []
        for h in holdouts:
            ran = [
                (agg[(d, h)][metric], d)
                for d in pyod
                if (d, h) in agg and agg[(d, h)][metric] is not None and agg[(d, h)]["split"] == split
            ]
            cells.append(f"{max(ran)[0]:.3f} ({max(ran)[1]})" if ran else "-")
        where = f", {split} split" if len(splits) > 1 else ""
        body.append(f"| best PyOD (picked per hold-out on test labels{where}) | " + " | ".join(cells) + " |")
    for d in detectors:
        e0 = next((agg[(d, h)] for h in holdouts if (d, h) in agg), None)
        if e0 is None or e0["family"] != "jebm" or e0["score"] != "score":
            continue
        cells = [_pm(agg[(d, h)], metric) if (d, h) in agg else "-" for h in holdouts]
        body.append(f"| {d} | " + " | ".join(cells) + " |")
    if metric != "auprc":
        return head + body
    if spec.data.strip().lower() == "mnist":
        for name, values in PUBLISHED_AUPRC.items():
            cells = [f"{values[h]:.3f}" if h in values else "-" for h in holdouts]
            body.append(f"| {name} | " + " | ".join(cells) + " |")
    chance = []
    for h in holdouts:
        rates = [e["anomaly_rate"] for (d, hh), e in agg.items() if hh == h and e["anomaly_rate"] is not None]
        chance.append(f"{rates[0]:.3f}" if rates else "-")
    body.append("| chance (anomaly rate) | " + " | ".join(chance) + " |")
    return head + body


def bench_settings(spec: BenchSpec) -> dict[str, Any]:
    """Everything needed to read or repeat the run: request, detectors' settings, jebm configs, machine."""
    return {
        "command": spec.command,
        "started": _now(),
        "data": spec.data,
        "holdouts": spec.holdouts,
        "seeds": spec.seeds,
        "max_train": spec.max_train,
        "time_budget_seconds": spec.time_budget,
        "device": spec.device,
        "split_kind": spec.split,
        "split": (
            "published: the published loaders' split (splits.py: RandomState(42), a second permutation for "
            "the test part; the seeds only seed the models). "
            if "published" in spec.splits
            else ""
        )
        + ("clean: " if "published" in spec.splits else "")
        + "prepare_data(data, holdout=D, seed=s): train on 80 % of the normal classes (jebm carves "
        "train.val_fraction of it for calibration; PyOD fits on all of it), test = the other 20 % + "
        "every image of D",
        "jebm_base_config": spec.base_config.to_dict(),
        "detectors": {
            d.name: d.describe()
            if isinstance(d, JEBMVariant)
            else d.describe(spec.seeds[0], spec.base_config.model.image_size**2)
            for d in spec.detectors
        },
        "published_auprc": {k: {str(h): v for h, v in vals.items()} for k, vals in PUBLISHED_AUPRC.items()},
        "machine": machine_info(),
    }


def machine_info() -> dict[str, Any]:
    import sklearn
    import torch

    try:
        import pyod

        pyod_version = pyod.__version__
    except ImportError:  # pragma: no cover - pyod is a dependency
        pyod_version = None
    repo = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "pyod": pyod_version,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "date": _now(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _available_components(config: Config) -> set[str]:
    from .model import JointEBM
    from .scoring import component_names, posterior_averaged

    if config.model.is_vector:
        config = for_vectors(config, max(config.model.vector_dim, 1))
    return set(
        component_names(
            JointEBM(config.model),
            True,
            llr_samples=1,
            posterior=posterior_averaged(config.score),
            top_knn=config.score.top_knn,
        )
    )


def _split_components(token: str) -> tuple[str, list[str]]:
    """``"jebm[latent_knn+recon]"`` -> ("jebm", ["latent_knn", "recon"]); a list value stays in the name:
    ``"jebm:z_dims=[8,4]"`` -> ("jebm:z_dims=[8,4]", [])."""
    m = re.fullmatch(r"(.*[^=\s])\[\s*([A-Za-z_]\w*(?:\s*\+\s*[A-Za-z_]\w*)*)\s*\]", token.strip())
    if m is None:
        return token.strip(), []
    return m.group(1).strip(), [c.strip() for c in m.group(2).split("+")]


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so ``z_dims=[8,4]`` and ``jebm[a+b]`` stay whole."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def _get(config: Config, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "jebm"


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return v


def _pm(entry: dict[str, Any], key: str) -> str:
    if entry.get(key) is None:
        return "-"
    std = entry.get(key + "_std")
    return f"{entry[key]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))
