"""The benchmark's report: mean +/- spread per detector and hold-out, the markdown tables and PR figures."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..evaluate import detection_metrics
from .detectors import PIXEL_INPUT, PUBLISHED_AUPRC, VECTOR_INPUT, JEBMVariant

if TYPE_CHECKING:
    from .runner import BenchSpec


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
            "sample_steps",
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
        steps = sorted({round(e["sample_steps"]) for e in cells if e is not None and e.get("sample_steps") is not None})
        rows.append(
            f"| {d} | {', '.join(map(str, steps)) or '-'} | "
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
        "better. Not comparable with Inception FID. Left out of fit s. Prior steps: the prior Langevin chain's "
        "length behind the samples (train.sample_steps; 0 for a Gaussian prior, whose samples are exact).",
        "",
        "| | prior steps | " + " | ".join(str(h) for h in holdouts) + " |",
        "| --- | --- |" + " --- |" * len(holdouts),
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


def _pm(entry: dict[str, Any], key: str) -> str:
    if entry.get(key) is None:
        return "-"
    std = entry.get(key + "_std")
    return f"{entry[key]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


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
        "jobs": spec.jobs,
        "job_threads": spec.job_threads,
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
