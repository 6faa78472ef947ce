"""``jebm-od score``: files, folders or tables in; a label, a calibrated score and the reason out."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import console, fail, load_model_or_fail, warn_off_calibration


def score(
    paths: list[Path] = typer.Argument(
        ...,
        help="Image files and/or folders (searched recursively); for a vector "
        "model, tables (.csv, .parquet, .npy, .npz), one row per input.",
    ),
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    out: Optional[Path] = typer.Option(None, help="Write one row per input to .csv, .json or .parquet."),
    maps: Optional[Path] = typer.Option(None, help="Write per-pixel anomaly-map overlays (PNG) into this folder."),
    steps: Optional[int] = typer.Option(None, help="Posterior Langevin steps K (default: the model's score.steps)."),
    top: int = typer.Option(10, help="How many of the most anomalous inputs to show."),
    engine: str = typer.Option(
        "local",
        help="local (this process) or spark: `score --engine spark INPUT.parquet "
        "OUTPUT.parquet` scores a parquet dataset (column pixels or path) with "
        "the MLflow pyfunc model through mlflow.pyfunc.spark_udf.",
    ),
    spark_master: Optional[str] = typer.Option(
        None, help="Spark master URL for --engine spark (default: local[*], or what spark-submit set up)."
    ),
    batch_rows: int = typer.Option(2048, help="--engine spark: rows per Arrow batch handed to the model."),
    overwrite: bool = typer.Option(False, help="--engine spark: replace OUTPUT if it exists."),
    verbose: bool = typer.Option(
        False, "--verbose", help="List the files in the folders that were skipped as not images."
    ),
    polarity: Optional[str] = typer.Option(
        None,
        help="keep: score the pixels as they are (an inverted image may be the anomaly); auto: invert gray "
        "dark-on-light images to light-on-dark first (default: as the model was fitted, else keep). Either way "
        "the summary says how many there were.",
    ),
) -> None:
    """Score images: a label, a score in [0, 1] and the component that contributed most.

    Exit codes: 0 when at least one input was scored, 1 when none could be, 2 on usage errors.
    """
    if engine == "spark":
        if polarity is not None:
            fail("--polarity is not available with --engine spark: the logged model keeps the pixels as they are")
        if maps is not None:
            fail("--maps is not available with --engine spark (anomaly maps are written by the local engine)")
        _score_spark(paths, model, out, steps, top, spark_master, batch_rows, overwrite)
        return
    if engine != "local":
        fail(f"--engine {engine!r}: expected local or spark")
    from outlier_jebm.batch import ResultWriter, partial_path, score_files, score_tables
    from outlier_jebm.data import POLARITIES, non_image_files

    if polarity is not None and polarity not in POLARITIES:
        fail(f"--polarity {polarity!r}: expected keep or auto")
    from outlier_jebm.scoring import Scorer

    loaded = load_model_or_fail(model)
    polarity = polarity or loaded.meta.get("polarity", "keep")
    if loaded.calibration is None:
        fail(f"{loaded.path}: the model has no calibration.json (it was not fitted to the end); refit it")
    vectors = loaded.config.model.is_vector
    if vectors and maps is not None:
        fail("--maps draws images: a vector model has none (each row's per-component scores are in --out)")
    from outlier_jebm.config import ConfigError

    try:
        scorer = Scorer(loaded, steps=steps)
    except ConfigError as exc:
        fail(f"--steps: {exc}")
    warn_off_calibration(loaded, steps)
    columns = scorer.component_names
    writer = None
    if out is not None:
        given = {p.expanduser().resolve() for p in paths}
        if {out.expanduser().resolve(), partial_path(out).expanduser().resolve()} & given:
            fail(f"--out {out} (or its .partial file) is one of the inputs: write the scores elsewhere")
        try:
            writer = ResultWriter(out, columns)
        except ValueError as exc:
            fail(str(exc))
    rows_scored, n_flagged, errors, top_rows, light = 0, 0, [], [], []
    progress = Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task("score", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        rows = (
            score_tables(scorer, paths, on_progress=on_progress)
            if vectors
            else score_files(scorer, paths, maps_dir=maps, on_progress=on_progress, polarity=polarity, light=light)
        )
        try:
            for row in rows:
                if writer is not None:
                    writer.write(row)
                if row["error"]:
                    errors.append((row["path"], row["error"]))
                    continue
                rows_scored += 1
                n_flagged += int(row["label"])
                top_rows.append(
                    (row["score_normalized"], row["path"], row["label"], row["top_component"], row["score"])
                )
                top_rows = sorted(top_rows, reverse=True)[:top]
        except BaseException:  # an interrupt, or a failure writing: what was scored is kept, --out is untouched
            if writer is not None:
                writer.close(complete=False)
                if writer.partial.exists():
                    console.print(
                        f"[yellow]stopped:[/] the rows scored so far are in {escape(str(writer.partial))}; "
                        f"{escape(str(out))} is unchanged",
                        soft_wrap=True,
                    )
            raise
    if writer is not None:
        writer.close()
    skipped = [] if vectors else non_image_files(paths)
    _print_score_summary(
        rows_scored, n_flagged, errors, top_rows, loaded, out, maps, inputs=paths, skipped=skipped, verbose=verbose
    )
    if light:
        n = len(light)
        subject, was, now, obj = (
            ("1 image is", "it was", "it is", "it") if n == 1 else (f"{n} images are", "they were", "they are", "them")
        )
        action = (
            "inverted to light-on-dark before scoring (--polarity auto)"
            if polarity == "auto"
            else f"scored as {now} (--polarity auto would invert {obj} first)"
        )
        Console().print(f"{subject} dark on light; {was} {action}", soft_wrap=True)
    raise typer.Exit(0 if rows_scored else 1)


def _score_spark(paths, model, out, steps, top, spark_master, batch_rows, overwrite) -> None:
    from rich.table import Table

    from outlier_jebm.data import DataError
    from outlier_jebm.spark import pyfunc_uri_for, quiet, score_parquet, spark_session

    if steps is not None:
        fail("--steps is not available with --engine spark: the logged model scores with its own score.steps")
    if out is not None and len(paths) == 1:
        paths = [paths[0], out]
    if len(paths) != 2:
        fail("--engine spark takes INPUT OUTPUT: a parquet dataset to score and where to write the scored one")
    src, dst = (str(p) for p in paths)
    if not Path(src).exists() and "://" not in src:
        fail(f"{src}: no such file or folder")
    if batch_rows < 1:
        fail("--batch-rows must be at least 1")
    if Path(dst).exists() and not overwrite:
        fail(f"{dst}: already exists (pass --overwrite to replace it)")
    try:
        import pyspark  # noqa: F401
    except ImportError:
        fail("--engine spark needs pyspark: pip install 'jebm-od[spark]' (and Java 17 or newer)")
    quiet()
    with tempfile.TemporaryDirectory(prefix="jebm-od-spark-") as work:
        try:
            uri = pyfunc_uri_for(model, Path(work))
        except (FileNotFoundError, DataError) as exc:
            fail(str(exc))
        with console.status("starting Spark"):
            spark = spark_session(spark_master)
        try:
            with console.status(f"scoring {src} on Spark ({spark.sparkContext.master})"):
                summary = score_parquet(spark, uri, src, dst, overwrite=overwrite, batch_rows=batch_rows, top=top)
        except DataError as exc:
            fail(str(exc))
        finally:
            spark.stop()
    out_console = Console()
    out_console.print(f"model {escape(str(summary.model_uri))}", soft_wrap=True)
    out_console.print(
        f"scored [bold]{summary.scored}[/] of {summary.rows} rows in {summary.seconds:.1f} s: "
        f"[bold red]{summary.flagged}[/] flagged as anomalies; {summary.n_errors} unusable",
        soft_wrap=True,
    )
    if summary.top:
        table = Table(title=f"most anomalous (top {len(summary.top)})")
        for col in ("row", "score [0-1]", "label", "top component"):
            table.add_column(col)
        for r in summary.top:
            table.add_row(
                r["_row"] or "-",
                f"{r['score_normalized']:.3f}",
                "[red]anomaly[/]" if r["label"] == 1 else "normal",
                r["top_component"],
            )
        out_console.print(table)
    if summary.errors:
        table = Table(title="not scored (the first 10; every row has its reason in the error column)")
        table.add_column("row")
        table.add_column("reason")
        for row, reason in summary.errors[:10]:
            table.add_row(row or "-", reason)
        out_console.print(table)
    out_console.print(f"results: {escape(str(summary.output))}", soft_wrap=True)
    raise typer.Exit(0 if summary.scored else 1)


def _shown_path(path: str, inputs: list[Path], width: int) -> str:
    """``path`` as a person finds it: from the input argument that holds it (a folder given as
    /long/run/images_eval shows images_eval/a/1.png), then cut from the left to ``width``."""
    for root in inputs:
        base = str(root)
        if root.is_dir() and path.startswith(base.rstrip("/") + "/"):
            path = str(Path(root.resolve().name or base) / path[len(base.rstrip("/")) + 1 :])
            break
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def _print_score_summary(
    n_scored, n_flagged, errors, top_rows, loaded, out, maps, inputs=(), skipped=(), verbose=False
) -> None:
    from rich.table import Table

    out_console = Console()
    cal = loaded.calibration
    out_console.print(
        f"model {loaded.path}  (threshold at {100 * cal['false_alarm_rate']:.1f} % false alarms on held-in data)",
        soft_wrap=True,
    )
    out_console.print(
        f"scored [bold]{n_scored}[/] inputs: [bold red]{n_flagged}[/] flagged as anomalies; {len(errors)} unusable"
        + (
            f"; {len(skipped)} other files in the folders skipped (not images"
            + (": listed below)" if verbose else "; --verbose lists them)")
            if skipped
            else ""
        ),
        soft_wrap=True,
    )
    inputs = [Path(p) for p in inputs]
    # the path gives way first: the other columns keep their widest entry whole (a component name cut to
    # "latent_kn…" names nothing), plus rich's borders and padding (3 per column and 1)
    comp_width = max([len("top component"), *(len(str(r[3])) for r in top_rows)])
    width = max(12, out_console.width - (comp_width + len("score [0-1]") + len("anomaly") + 13))
    if top_rows:
        table = Table(title=f"most anomalous (top {len(top_rows)}{'' if n_flagged else ', none above the threshold'})")
        table.add_column("path", no_wrap=True)
        for col in ("score [0-1]", "label"):
            table.add_column(col)
        table.add_column("top component", no_wrap=True, min_width=comp_width)
        for norm, path, label, comp, _ in top_rows:
            table.add_row(
                escape(_shown_path(str(path), inputs, width)),
                f"{norm:.3f}",
                "[red]anomaly[/]" if label else "normal",
                comp,
            )
        out_console.print(table)
    if errors:
        table = Table(title="not scored")
        table.add_column("path")
        table.add_column("reason")
        for path, reason in errors[:50]:
            table.add_row(escape(_shown_path(str(path), inputs, width)), escape(str(reason)))
        out_console.print(table)
        if len(errors) > 50:
            out_console.print(f"... and {len(errors) - 50} more (see --out)", soft_wrap=True)
    if skipped and verbose:
        for path in skipped:
            out_console.print(f"skipped (not an image): {escape(str(path))}", soft_wrap=True)
    if out is not None:
        out_console.print(f"results: {escape(str(out))}", soft_wrap=True)
    if maps is not None:
        out_console.print(f"anomaly maps: {escape(str(maps))}/", soft_wrap=True)
