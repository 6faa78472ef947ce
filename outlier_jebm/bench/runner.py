"""The benchmark's runner: every detector on each split, one metric code path, rows written after every cell."""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import Config, for_vectors
from ..evaluate import detection_metrics
from ..fileio import atomic_path, write_text_atomic
from .detectors import BenchError, JEBMVariant, PyODDetector, is_vector_split, pyod_inputs
from .mlflow_rows import log_cell as _log_cell
from .report import _now, bench_settings, pr_figure, render_markdown

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
    "sample_steps",
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
    jobs: int = 1  # cells run at once, each in its own worker process (parallel.py); 1: in this process
    job_threads: int | None = None  # torch/BLAS threads per worker (None: the usable cores over jobs)

    @property
    def splits(self) -> list[str]:
        """The splits to run, in order (``split`` is one name or a comma-separated list)."""
        from ..splits import SPLITS

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
    """Run every (split, holdout, seed, detector) cell; write results.csv, results.md, settings.json and figures.

    Rows are written after every cell, so a stopped run keeps what it did. With ``spec.jobs`` above 1
    the cells run in that many worker processes (``parallel.py``); rows are then written as cells
    finish, and once more in cell order at the end.

    Parameters
    ----------
    spec : BenchSpec
        The data, hold-outs, seeds, splits, detectors (parsed: ``PyODDetector`` and
        ``JEBMVariant``), output folder, tracking, time budget and jobs.
    on_row, on_message, on_cell : callable, optional
        Progress hooks: each result row, each message, and each cell started (finished, with jobs).

    Returns
    -------
    BenchResult
        Every row, the output folder, the wall time and the figures written.
    """
    say = on_message or (lambda _m: None)
    t0 = time.perf_counter()
    if spec.jobs < 1 or (spec.job_threads is not None and spec.job_threads < 1):
        raise BenchError(f"jobs and threads per job must be at least 1, got {spec.jobs} and {spec.job_threads}")
    folders = [_slug(d.name) for d in spec.detectors if isinstance(d, JEBMVariant)]
    shared = sorted({f for f in folders if folders.count(f) > 1})
    if shared:  # one model folder per variant: two fits must not write (or, with jobs, race on) one
        names = [d.name for d in spec.detectors if _slug(d.name) == shared[0]]
        raise BenchError(f"jebm variants {' and '.join(map(repr, names))} would share model folders: rename one")
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(spec)
    _write_json(out / "settings.json", settings)
    cells = [
        Cell(sp, h, seed, det)
        for sp in spec.splits
        for h in spec.holdouts
        for seed in spec.seeds
        for det in spec.detectors
    ]
    keyed: list[tuple[int, int, dict[str, Any]]] = []  # (cell index, row index within the cell, row)
    curves: dict[tuple[str, int], dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def current_rows() -> list[dict[str, Any]]:
        return [row for _, _, row in keyed]

    def record(index: int, outcome: CellOutcome) -> None:
        cell = cells[index]
        for j, (row, scores, params, extra) in enumerate(outcome.rows):
            row["split"] = cell.split  # before MLflow sees the row
            row["test_in_train"] = outcome.test_in_train
            if spec.track and outcome.labels is not None:
                try:
                    row["mlflow_run_id"] = _log_cell(spec, row, params, extra, outcome.labels, scores)
                except Exception as exc:  # the row is measured: keep it even if MLflow is unreachable
                    row["note"] = "; ".join(filter(None, [row["note"], f"MLflow logging failed: {exc}"]))
                    say(f"MLflow logging failed for {row['detector']}: {exc}")
            whole_score = not row["score"].startswith("component")
            if scores is not None and row["status"] == "ok" and cell.seed == spec.seeds[0] and whole_score:
                curves.setdefault((cell.split, cell.holdout), {})[row["detector"]] = (outcome.labels, scores)
            keyed.append((index, j, row))
            write_csv(out / "results.csv", current_rows())
            (out / "results.md").write_text(render_markdown(current_rows(), spec, settings))
            if on_row is not None:
                on_row(row)

    # the budget is for the cells (data loading included), not the set-up
    deadline = None if spec.time_budget is None else time.monotonic() + spec.time_budget
    try:
        if spec.jobs > 1 and len(cells) > 1:
            from .parallel import run_in_workers

            settings["job_threads"] = run_in_workers(spec, cells, deadline, record, say, on_cell)
        else:
            cache: dict[tuple[str, int, int], Any] = {}
            for i, cell in enumerate(cells):
                if on_cell is not None:
                    on_cell(i, len(cells), cell.label(len(spec.splits) > 1))
                record(i, run_cell(spec, cell, deadline, say, cache))
        if on_cell is not None:
            on_cell(len(cells), len(cells), "done")
    finally:  # also when a data error or an interrupt stops the run: what was measured is kept whole
        keyed.sort(key=lambda t: t[:2])
        rows = current_rows()
        write_csv(out / "results.csv", rows)
        (out / "results.md").write_text(render_markdown(rows, spec, settings))
        figures = _figures(out, spec, curves)
    settings["finished"] = _now()
    settings["wall_seconds"] = time.perf_counter() - t0
    _write_json(out / "settings.json", settings)
    return BenchResult(rows=rows, out_dir=out, seconds=time.perf_counter() - t0, figures=figures)


@dataclass(frozen=True)
class Cell:
    """One (split, holdout, seed, detector) of the run."""

    split: str
    holdout: int
    seed: int
    detector: PyODDetector | JEBMVariant

    def label(self, several_splits: bool) -> str:
        return f"holdout {self.holdout} seed {self.seed} {self.detector.name}" + (
            f" ({self.split} split)" if several_splits else ""
        )


@dataclass
class CellOutcome:
    """What a cell gives the run: its rows, the test labels (None: nothing was scored), the overlap flag."""

    rows: CellRows
    labels: np.ndarray | None
    test_in_train: Any = ""


def run_cell(
    spec: BenchSpec, cell: Cell, deadline: float | None, say: MessageHook, cache: dict[tuple[str, int, int], Any]
) -> CellOutcome:
    """One cell, in this process: skipped past the deadline (``time.monotonic``), else fitted and scored.

    ``cache`` keeps the last split prepared, so that the detectors of one (split, holdout, seed) share it.
    A detector that raises gives a failed row; a data error (the split cannot be made) propagates.
    """
    det = cell.detector
    if deadline is not None and time.monotonic() >= deadline:
        return CellOutcome([(row, None, {}, {}) for row in _skipped_rows(det, cell.holdout, cell.seed)], None)
    td = _prepared(spec, cell, say, cache)
    try:
        if isinstance(det, JEBMVariant):
            rows = _jebm_cell(det, td, cell.holdout, cell.seed, spec, say, cell.split)
        else:
            rows = _pyod_cell(det, td, cell.seed)
    except Exception as exc:  # one broken detector must not lose the others' rows
        rows = [_failed_row(det, cell.holdout, cell.seed, exc)]
    return CellOutcome(rows, td.test_is_anomaly, td.test_in_train)


def _prepared(spec: BenchSpec, cell: Cell, say: MessageHook, cache: dict[tuple[str, int, int], Any]):
    from ..pipeline import prepare_data

    key = (cell.split, cell.holdout, cell.seed)
    if key not in cache:
        cache.clear()  # one split at a time: MNIST's is a few hundred MB
        td = prepare_data(
            spec.data,
            holdout=cell.holdout,
            seed=cell.seed,
            val_fraction=spec.base_config.train.val_fraction,
            max_train=spec.max_train,
            image_size=spec.base_config.model.image_size,
            data_dir=spec.data_dir,
            channels=spec.base_config.model.channels,
            data_kind=spec.base_config.model.data_kind,
            split=cell.split,
        )
        unit = "vectors" if is_vector_split(td) else "images"
        say(
            f"holdout {cell.holdout} seed {cell.seed}: {len(td.train) + len(td.val)} training {unit} "
            f"({len(td.val)} of them held in for jebm's calibration), {len(td.test)} test {unit}, "
            f"{100 * float(np.mean(td.test_is_anomaly)):.1f} % anomalies"
        )
        cache[key] = td
    return cache[key]


def _figures(out: Path, spec: BenchSpec, curves: dict[tuple[str, int], dict[str, Any]]) -> list[Path]:
    figures = []
    for split, holdout in ((sp, h) for sp in spec.splits for h in spec.holdouts):
        if not curves.get((split, holdout)):
            continue
        import matplotlib.pyplot as plt

        tag = "" if split == "clean" else f"-{split}"
        path = out / f"pr_holdout{holdout}{tag}.png"
        title = f"holdout {holdout}, seed {spec.seeds[0]}" + (f", {split} split" if tag else "")
        order = {d.name: k for k, d in enumerate(spec.detectors)}
        ranked = dict(sorted(curves[split, holdout].items(), key=lambda kv: order.get(kv[0], len(order))))
        fig = pr_figure(ranked, title)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        figures.append(path)
    return figures


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
    from ..checkpoint import load_model
    from ..pipeline import run_fit
    from ..scoring import Scorer
    from ..train import MLE_ELBO_NOTE, held_in_elbo_label, planned_epochs, resolve_device

    cfg = variant.config.with_overrides(train={"seed": seed, "max_train": spec.max_train})
    if is_vector_split(td):
        cfg = for_vectors(cfg, td.train.shape[1])
    tag = "" if split == "clean" else f"-{split}"
    model_dir = Path(spec.out_dir) / "models" / f"{_slug(variant.name)}-holdout{holdout}-seed{seed}{tag}"
    n_epochs = planned_epochs(cfg, len(td.train))  # run_fit raises the epochs of a small set to train.min_steps

    elbo = held_in_elbo_label(cfg.train.scheme)
    if cfg.train.scheme == "mle":
        say(f"  {variant.name} holdout {holdout} seed {seed}: {MLE_ELBO_NOTE}")

    def on_epoch_end(epoch: int, m: dict[str, float]) -> None:
        # the EBM's f gap (codes minus prior chains) and the held-in figures show a fit going wrong before its scores do
        watch = "".join(
            f"  {label} {m[key]:.1f}"
            for key, label in (("f_gap", "f gap"), ("val_neg_elbo", elbo), ("val_recon", "val recon"))
            if key in m
        )
        say(
            f"  {variant.name} holdout {holdout} seed {seed}: epoch {epoch + 1}/{n_epochs}  loss {m['loss']:.1f}  "
            f"recon {m['recon']:.1f}{watch}  {m['images_per_second']:.0f} img/s  {m['seconds_per_epoch']:.0f} s"
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
    # the model's place inside the output folder: a committed results.csv names no one's file system
    note = f"training {train_seconds:.1f} s of the fit; model {model_dir.relative_to(spec.out_dir).as_posix()}"
    if summary.stopped:
        note += f"; breakdown guard: {summary.stopped}"
        say(f"  {variant.name} holdout {holdout} seed {seed}: breakdown guard: {summary.stopped}")
    params = {**variant.describe(), "config": cfg.to_dict(), "model_dir": str(model_dir)}
    extra = {"history": summary.history}
    row = _scored_row(
        variant.name, variant.name, "score", "jebm", td, seed, table["score"], fit_seconds, score_seconds, note=note
    )
    if summary.sample_quality is not None:
        row["sample_fid_lenet"] = summary.sample_quality["fid_lenet"]
        row["sample_confidence"] = summary.sample_quality["lenet_confidence"]
        row["sample_steps"] = int(summary.sample_quality["steps"])  # prior Langevin steps of those samples
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


def _family(det: PyODDetector | JEBMVariant) -> str:
    return "jebm" if isinstance(det, JEBMVariant) else "pyod"


def _status_row(det: PyODDetector | JEBMVariant, holdout: int, seed: int, status: str) -> dict[str, Any]:
    """The whole-score row of a cell that gave no scores (failed, skipped), with its status."""
    row = _base_row(det.name, det.name, "score", _family(det), holdout, seed)
    row["status"] = status
    return row


def _skipped_rows(det: PyODDetector | JEBMVariant, holdout: int, seed: int) -> list[dict[str, Any]]:
    family = _family(det)
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
    message = " ".join(str(exc).split())[:300]
    row = _status_row(det, holdout, seed, f"failed: {type(exc).__name__}: {message}")
    if isinstance(det, JEBMVariant):
        params = det.describe()
    else:
        params = {"family": "pyod", "class": det.cls_path, "changed_from_defaults": dict(det.settings)}
    return row, None, params, {}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows so far, written to a temporary file and moved into place (a stopped run keeps a whole file)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in COLUMNS})


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "jebm"


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return v


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))
