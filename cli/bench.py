"""``jebm-od bench``: parse, call ``outlier_jebm.bench.run_bench``, present."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer


def bench(
    data: str = typer.Option(
        "mnist", help="Labelled dataset: mnist or digits (images); breast_cancer, wine, digits64 or mnist784 (vectors)."
    ),
    holdout: str = typer.Option("1,4,5,7,9", help="Held-out digits, comma-separated (one split per digit and seed)."),
    detectors: str = typer.Option(
        "jebm,iforest,ecod,hbos,knn,pca,autoencoder,vae,deepsvdd",
        help="Comma-separated: jebm, jebm:KEY=VALUE:KEY=VALUE (a variant of the base config, e.g. "
        "jebm:prior=gaussian), a --jebm-variant name, any of them with [COMPONENT+COMPONENT], or a PyOD "
        "detector (see --list-detectors).",
    ),
    jebm_variant: Optional[list[str]] = typer.Option(
        None,
        "--jebm-variant",
        help="NAME=KEY=VALUE,KEY=VALUE: a named jebm variant (repeatable), e.g. "
        "long=train.prior_langevin.steps=100,epochs=20. Runs even when --detectors does not list it.",
    ),
    components: str = typer.Option(
        "all",
        help="Score components reported as their own rows for every jebm model: all (those not constant), "
        "none, or a comma list (e.g. latent_knn,neg_log_prior).",
    ),
    seeds: str = typer.Option("0", help="Split seeds, comma-separated (also each jebm model's train.seed)."),
    config: Optional[Path] = typer.Option(
        None,
        help="Base jebm config (default: configs/mnist.yaml, the conv backbone, for images; "
        "configs/vectors.yaml for vectors).",
    ),
    epochs: Optional[int] = typer.Option(
        None, help="Override train.epochs of the base config (variants may override it)."
    ),
    max_train: Optional[int] = typer.Option(
        None, help="Cap the training part (as fit --max-train; the held-in validation share is not capped)."
    ),
    time_budget: Optional[str] = typer.Option(
        None,
        help="Wall-time budget for the whole run (seconds, or 30m, 2h): cells not started in time are "
        "written as 'skipped: time budget' rows.",
    ),
    out: Optional[Path] = typer.Option(
        None,
        help="Results folder (default: bench-<time>): results.csv, results.md, "
        "settings.json, pr_holdout<D>.png, models/.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda (jebm models)."),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."
    ),
    track: bool = typer.Option(True, help="Log one MLflow run per cell."),
    data_dir: Optional[Path] = typer.Option(None, help="Where MNIST files are looked for and cached."),
    split: str = typer.Option(
        "clean",
        help="clean (one permutation per seed, no overlap), published (MNIST: the "
        "papers' loaders' split, whose test normals are mostly training images), "
        "or clean,published: both, side by side in one report.",
    ),
    jobs: int = typer.Option(
        1,
        min=1,
        help="Cells run at once, each in its own worker process with the cores shared out among them "
        "(1: one after the other in this process). On 2 cores, --jobs 2 ran two jebm cells in 0.68x "
        "the time of --jobs 1 (a second thread helps one fit only while no other process holds a core).",
    ),
    list_detectors: bool = typer.Option(
        False, "--list-detectors", help="List the PyOD detectors and their settings, then exit."
    ),
) -> None:
    """Every detector on the same hold-out splits: AUPRC, AUROC, fit time, scoring speed; CSV, markdown, MLflow."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from outlier_jebm.bench import PYOD_DETECTORS, BenchError, BenchSpec, run_bench
    from outlier_jebm.data import DataError

    from .bench_spec import parse_detectors, parse_int_list, parse_seconds
    from .common import check_device_or_fail, console, fail, load_config

    if list_detectors:
        table = Table(title="PyOD detectors in the benchmark (input: pixels in [0, 1], flattened)")
        for col in ("name", "class", "changed from PyOD's defaults", "why"):
            table.add_column(col, overflow="fold")
        for det in PYOD_DETECTORS.values():
            table.add_row(det.name, det.cls_path, str(det.settings or "-"), det.why)
        Console().print(table)
        return

    from outlier_jebm.config import default_config_path
    from outlier_jebm.tables import is_vector_source

    base = load_config(config or default_config_path("vector" if is_vector_source(data) else "image"))
    check_device_or_fail(device)
    try:
        if epochs is not None:
            base = base.with_overrides(train={"epochs": epochs})
        variants = {}
        for item in jebm_variant or []:
            name, eq, overrides = item.partition("=")
            if not eq or not name.strip() or not overrides.strip():
                raise BenchError(f"--jebm-variant {item!r}: expected NAME=KEY=VALUE,KEY=VALUE")
            variants[name.strip()] = overrides
        spec = BenchSpec(
            data=data,
            holdouts=parse_int_list(holdout, "--holdout"),
            seeds=parse_int_list(seeds, "--seeds"),
            detectors=parse_detectors(detectors, base, variants=variants, components=components),
            base_config=base,
            out_dir=out or Path(f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"),
            time_budget=parse_seconds(time_budget),
            max_train=max_train,
            data_dir=data_dir,
            device=device,
            tracking_uri=tracking_uri,
            track=track,
            split=split,
            jobs=jobs,
            command="jebm-od " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "",
        )
        splits = spec.splits  # an unknown split name is an error before anything runs
    except (BenchError, ValueError) as exc:
        fail(str(exc))

    # soft_wrap on every line below: a row, a path or an epoch line stays one line at any width, so a log can be grepped
    console.print(
        f"bench: {len(spec.detectors)} detectors x holdout {', '.join(map(str, spec.holdouts))} x "
        f"seed {', '.join(map(str, spec.seeds))} on {data}"
        + (f" ({' and '.join(splits)} splits)" if len(splits) > 1 else "")
        + f" -> {spec.out_dir}"
        + (f" (time budget {spec.time_budget:.0f} s)" if spec.time_budget is not None else ""),
        soft_wrap=True,
    )
    progress = Progress(
        TextColumn("[bold]bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    state: dict = {}

    def on_cell(done: int, total: int, label: str) -> None:
        if "task" not in state:
            state["task"] = progress.add_task(label, total=total)
        progress.update(state["task"], completed=done, description=label)

    def on_row(row: dict) -> None:
        where = escape(f"holdout {row['holdout']} seed {row['seed']}  {row['detector']:<26}")
        if row["status"] == "ok":
            progress.console.print(
                f"{where} AUPRC {row['auprc']:.3f}  AUROC {row['auroc']:.3f}  "
                f"fit {row['fit_seconds']:.1f} s  {row['score_images_per_second']:,.0f} img/s"
                + (f"  [yellow]{row['nonfinite_scores']} non-finite scores[/]" if row["nonfinite_scores"] else ""),
                soft_wrap=True,
            )
        elif row["status"].startswith("failed"):
            progress.console.print(f"{where} [red]{escape(row['status'])}[/]", soft_wrap=True)
        else:
            progress.console.print(f"{where} [yellow]{escape(row['status'])}[/]", soft_wrap=True)

    try:
        with progress:
            result = run_bench(
                spec,
                on_row=on_row,
                on_message=lambda m: progress.console.print(escape(m), soft_wrap=True),
                on_cell=on_cell,
            )
    except DataError as exc:
        fail(str(exc))
    _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console

    out = Console()
    rows = result.rows
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    failed = sum(r["status"].startswith("failed") for r in rows)
    out.print(
        f"{len(rows)} rows in {result.seconds:.0f} s: {ok} ok, {skipped} skipped, {failed} failed", soft_wrap=True
    )
    md = (result.out_dir / "results.md").read_text()
    summary = md.split("## Summary: AUPRC", 1)
    if len(summary) == 2:
        out.print("Summary (AUPRC):" + summary[1].split("\n## ", 1)[0].rstrip())
    out.print(
        f"results: {result.out_dir / 'results.csv'}, {result.out_dir / 'results.md'}, "
        f"{result.out_dir / 'settings.json'}",
        soft_wrap=True,
    )
    for path in result.figures:
        out.print(f"figure:  {path}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)
