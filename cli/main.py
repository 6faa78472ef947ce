"""The ``jebm-od`` command line: parse, call the library, present."""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .bench import bench
from .common import console, fail, load_config

# MLflow's artifact progress bars and INFO lines (table creation, signature validation) interleave with
# the command's own output, which already names the run and the store. MLFLOW_LOGGING_LEVEL=INFO and
# MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true bring them back.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

app = typer.Typer(
    help="Image anomaly detection with a joint latent-space EBM prior on a multi-layer generator.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.command()
def fit(
    data: str = typer.Option(
        "mnist",
        help="mnist, digits, a folder of images, a .npy/.npz file of images; or "
        "vectors: a .csv/.parquet table (or .npy/.npz with a vector config), "
        "breast_cancer, wine, digits64, mnist784.",
    ),
    holdout: Optional[int] = typer.Option(None, help="Class held out as the anomaly class (hold-out protocol)."),
    config: Optional[Path] = typer.Option(
        None,
        help="YAML config (default: configs/mnist.yaml, the conv backbone, for images; "
        "configs/vectors.yaml for vectors).",
    ),
    epochs: Optional[int] = typer.Option(None, help="Override train.epochs."),
    max_train: Optional[int] = typer.Option(None, help="Use at most this many training images."),
    seed: Optional[int] = typer.Option(None, help="Override train.seed (split, init, shuffling)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Model directory (default: models/<data>-holdout<D>-<time>)."),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Where MNIST files are looked for and cached."),
    resume: bool = typer.Option(False, help="Continue training the model in --out from its last epoch."),
    register: Optional[str] = typer.Option(None, help="Also register the logged MLflow model under this name."),
    polarity: str = typer.Option(
        "keep",
        help="Image files: keep the pixels as they are, or auto: invert gray dark-on-light images to light-on-dark "
        "(score them with the same choice).",
    ),
) -> None:
    """Train a detector on in-distribution data and log the run (and the pyfunc model) to MLflow."""
    from outlier_jebm.checkpoint import CheckpointError
    from outlier_jebm.config import ConfigError
    from outlier_jebm.data import DataError
    from outlier_jebm.distributed import is_main_process
    from outlier_jebm.pipeline import default_out_dir, prepare_data, run_fit
    from outlier_jebm.train import TrainingDiverged

    # under torchrun every rank runs this command; rank 0 alone reports progress (errors come from any rank)
    main = is_main_process()
    say = console.print if main else (lambda *args, **kwargs: None)
    from outlier_jebm.config import default_config_path, for_vectors
    from outlier_jebm.tables import is_vector_source

    cfg = load_config(config or default_config_path("vector" if is_vector_source(data) else "image"))
    if resume and out is None:
        fail("--resume needs --out pointing at the model directory to continue")
    try:
        cfg = cfg.with_overrides(train={"epochs": epochs, "seed": seed, "max_train": max_train})
        with console.status(f"loading {data} ...") if main else nullcontext():
            td = prepare_data(
                data,
                holdout=holdout,
                seed=cfg.train.seed,
                val_fraction=cfg.train.val_fraction,
                max_train=cfg.train.max_train,
                image_size=cfg.model.image_size,
                data_dir=data_dir,
                channels=cfg.model.channels,
                data_kind=cfg.model.data_kind,
                polarity=polarity,
            )
        if td.train.ndim == 2:  # vectors: the data says how many features
            cfg = for_vectors(cfg, td.train.shape[1])
    except (DataError, ConfigError) as exc:
        fail(str(exc))
    out_dir = out or default_out_dir(td.name, holdout)
    say(
        f"training on [bold]{len(td.train)}[/] {'vectors' if cfg.model.is_vector else 'images'} of {td.name}"
        + (f" (digit {holdout} held out)" if holdout is not None else "")
        + f", {len(td.val)} held-in for validation; model -> {out_dir}"
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        say(f"data parallel on {world} processes: global batch {world} x {cfg.train.batch_size}")
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.1f}  recon {task.fields[recon]:.1f}  f-gap {task.fields[gap]:+.2f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not main,
    )
    state: dict = {}

    def on_start(n_epochs: int, steps: int) -> None:
        state["steps"] = steps
        state["task"] = progress.add_task(
            "fit", total=n_epochs * steps, epoch=f"1/{n_epochs}", loss=0.0, recon=0.0, gap=0.0
        )
        state["epochs"] = n_epochs

    def on_step(epoch: int, step: int, stats: dict) -> None:
        if step % 10 == 0 or step == state["steps"] - 1:
            progress.update(
                state["task"],
                completed=epoch * state["steps"] + step + 1,
                epoch=f"{epoch + 1}/{state['epochs']}",
                loss=stats["loss"],
                recon=stats["recon"],
                gap=stats.get("f_gap", 0.0),
            )

    def on_epoch_end(epoch: int, m: dict) -> None:
        progress.console.print(
            f"epoch {epoch + 1}: loss {m['loss']:.1f}  recon {m['recon']:.1f}  val -ELBO {m.get('val_neg_elbo', float('nan')):.1f}  "
            f"f post/prior {m['f_posterior']:+.2f}/{m.get('f_prior', 0.0):+.2f}  {m['images_per_second']:.0f} img/s  {m['seconds_per_epoch']:.0f} s"
        )

    try:
        with progress:
            summary = run_fit(
                cfg,
                td,
                out_dir=out_dir,
                device=device,
                tracking_uri=tracking_uri,
                resume=resume,
                register=register,
                on_step=on_step,
                on_start=on_start,
                on_epoch_end=on_epoch_end,
            )
    except TrainingDiverged as exc:
        fail(f"training stopped: {exc}", code=3)
    except (CheckpointError, ValueError) as exc:
        fail(str(exc))
    if not main:
        return
    last = summary.history[-1] if summary.history else {}
    console.print(
        f"[green]done[/] in {summary.wall_seconds:.0f} s "
        f"({last.get('images_per_second', 0):.0f} images/s in training, "
        f"val -ELBO {last.get('val_neg_elbo', float('nan')):.1f})"
    )
    console.print(f"model:      [bold]{summary.out_dir}[/]")
    if summary.sample_quality:
        _print_sample_quality(summary.sample_quality)
    if summary.run_id:
        console.print(f"MLflow run: [bold]{summary.run_id}[/] at {summary.tracking_uri}")
    if summary.model_uri:
        console.print(
            f"MLflow model: [bold]{summary.model_uri}[/]"
            + (f" (registered as [bold]{register}[/])" if register else "")
        )


@app.command()
def sample(
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    out: Path = typer.Option(Path("samples.png"), help="Where to write the grid (PNG)."),
    kind: str = typer.Option("prior", help="prior, hierarchical, or chains (short-run vs long-run)."),
    n: int = typer.Option(64, help="Number of prior samples."),
    steps: Optional[int] = typer.Option(None, help="Prior Langevin steps (default: the training value)."),
    seed: int = typer.Option(0),
    metrics: bool = typer.Option(
        False,
        "--metrics",
        help="Also measure sample quality: FID in the features of a "
        "LeNet trained in the project on the model's training part (not comparable with "
        "Inception FID) and the LeNet's mean confidence on the samples.",
    ),
    metrics_n: Optional[int] = typer.Option(
        None,
        help="--metrics: prior samples compared with as many training "
        "images (default: the model's train.sample_metrics, 10 000).",
    ),
    data: Optional[str] = typer.Option(
        None,
        help="--metrics: the training data, where the model's record of it "
        "cannot be loaded from here (e.g. a .npz with labels).",
    ),
    data_dir: Optional[Path] = typer.Option(None, help="--metrics: where MNIST files are looked for."),
) -> None:
    """Draw samples from the learned prior and write them as an image grid (--metrics: measure their quality)."""
    import torch

    from outlier_jebm.sampling import hierarchical_samples, prior_samples, sample_figures
    from outlier_jebm.viz import image_grid

    loaded = _load_model_or_fail(model)
    torch.manual_seed(seed)
    pr = loaded.config.train.prior_langevin
    k = steps if steps is not None else pr.steps
    if kind == "prior":
        grid = image_grid(prior_samples(loaded.model, n, steps=k, step_size=pr.step_size), 8)
    elif kind == "hierarchical":
        grid = image_grid(hierarchical_samples(loaded.model, 8, steps=k, step_size=pr.step_size), 8)
    elif kind == "chains":
        grid = sample_figures(loaded.model, steps=k, step_size=pr.step_size)["short_vs_long_run"]
    else:
        fail(f"--kind must be prior, hierarchical or chains, got {kind!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    console.print(f"wrote {out}")
    if metrics:
        from outlier_jebm.data import DataError
        from outlier_jebm.sample_quality import model_sample_quality

        try:
            quality = model_sample_quality(loaded, n=metrics_n, data=data, data_dir=data_dir, steps=k, seed=seed)
        except DataError as exc:
            fail(str(exc))
        _print_sample_quality(quality)


def _print_sample_quality(quality: dict) -> None:
    console.print(f"FID (in-project LeNet features, not Inception FID): {quality['fid_lenet']:.3f}")
    console.print(
        f"LeNet mean confidence: samples {quality['lenet_confidence']:.3f}, "
        f"training images {quality['lenet_confidence_training']:.3f} "
        f"(LeNet accuracy {quality['lenet_accuracy']:.3f})"
    )


def _load_model_or_fail(model: Optional[str], device: str = "cpu"):
    from outlier_jebm.checkpoint import CheckpointError, load_model
    from outlier_jebm.pipeline import resolve_model_dir

    try:
        return load_model(resolve_model_dir(model), device=device)
    except (CheckpointError, FileNotFoundError) as exc:
        fail(str(exc))


def _warn_steps_off_calibration(loaded, steps: Optional[int]) -> None:
    """Say so when the K scored at (--steps, else the model's score.steps) is not the calibration's K."""
    fitted = (loaded.calibration or {}).get("score_steps")
    steps = loaded.config.score.steps if steps is None else steps
    if steps < 0 or fitted is None or steps == fitted:
        return
    console.print(
        f"[yellow]warning:[/] the calibration was fitted at K = {fitted}; at K = {steps} the score, threshold and "
        f"kNN reference keep K = {fitted}'s scales. `jebm-od calibrate --steps {steps}` refits them.",
        soft_wrap=True,
    )


@app.command()
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
    from outlier_jebm.batch import ResultWriter, score_files, score_tables
    from outlier_jebm.data import POLARITIES, non_image_files

    if polarity is not None and polarity not in POLARITIES:
        fail(f"--polarity {polarity!r}: expected keep or auto")
    from outlier_jebm.scoring import Scorer

    loaded = _load_model_or_fail(model)
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
    _warn_steps_off_calibration(loaded, steps)
    columns = scorer.component_names
    writer = None
    if out is not None:
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
        for row in rows:
            if writer is not None:
                writer.write(row)
            if row["error"]:
                errors.append((row["path"], row["error"]))
                continue
            rows_scored += 1
            n_flagged += int(row["label"])
            top_rows.append((row["score_normalized"], row["path"], row["label"], row["top_component"], row["score"]))
            top_rows = sorted(top_rows, reverse=True)[:top]
    if writer is not None:
        writer.close()
    skipped = [] if vectors else non_image_files(paths)
    _print_score_summary(
        rows_scored, n_flagged, errors, top_rows, loaded, out, maps, inputs=paths, skipped=skipped, verbose=verbose
    )
    if light:
        Console().print(
            f"{len(light)} of the images are dark on light; "
            + (
                "they were inverted to light-on-dark before scoring (--polarity auto)"
                if polarity == "auto"
                else "they were scored as they are (--polarity auto would invert them first)"
            ),
            soft_wrap=True,
        )
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
    out_console.print(f"model {summary.model_uri}")
    out_console.print(
        f"scored [bold]{summary.scored}[/] of {summary.rows} rows in {summary.seconds:.1f} s: "
        f"[bold red]{summary.flagged}[/] flagged as anomalies; {summary.n_errors} unusable"
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
    out_console.print(f"results: {summary.output}")
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
    width = max(24, out_console.width - 48)  # the other columns take about 48
    if top_rows:
        table = Table(title=f"most anomalous (top {len(top_rows)}{'' if n_flagged else ', none above the threshold'})")
        table.add_column("path", no_wrap=True)
        for col in ("score [0-1]", "label", "top component"):
            table.add_column(col)
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
            out_console.print(f"... and {len(errors) - 50} more (see --out)")
    if skipped and verbose:
        for path in skipped:
            out_console.print(f"skipped (not an image): {escape(str(path))}", soft_wrap=True)
    if out is not None:
        out_console.print(f"results: {out}")
    if maps is not None:
        out_console.print(f"anomaly maps: {maps}/")


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    data: str = typer.Option("mnist", help="Dataset with labels: mnist or digits."),
    holdout: Optional[int] = typer.Option(
        None, help="Held-out digit (default: the one the model was trained without)."
    ),
    seed: Optional[int] = typer.Option(
        None, help="Split seed (default: the model's training seed, so test stays unseen)."
    ),
    steps: Optional[int] = typer.Option(None, help="Posterior Langevin steps K (default: the model's score.steps)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data_dir: Optional[Path] = typer.Option(None),
    tracking_uri: Optional[str] = typer.Option(None),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    split: str = typer.Option(
        "clean",
        help="clean (one permutation, no overlap) or published (the papers' "
        "loaders' MNIST split, whose test normals are mostly training images).",
    ),
) -> None:
    """AUPRC, AUROC, F1 and false-alarm rate on the hold-out protocol's test part."""
    import json

    from outlier_jebm.config import ConfigError
    from outlier_jebm.data import DataError
    from outlier_jebm.pipeline import run_evaluate

    loaded = _load_model_or_fail(model)
    if loaded.calibration is None:
        fail(f"{loaded.path}: the model has no calibration.json; refit it")
    holdout = holdout if holdout is not None else loaded.meta.get("holdout")
    if holdout is None:
        fail("--holdout is needed: the model was not trained with a held-out digit")
    _warn_steps_off_calibration(loaded, steps)
    if loaded.meta.get("holdout") not in (None, holdout):
        console.print(
            f"[yellow]warning:[/] the model was trained with digit {loaded.meta['holdout']} held out, not {holdout}",
            soft_wrap=True,
        )
    try:
        with console.status("scoring the test part ..."):
            run = run_evaluate(
                loaded,
                data,
                holdout,
                seed=seed,
                steps=steps,
                device=device,
                data_dir=data_dir,
                tracking_uri=tracking_uri,
                split=split,
            )
    except (DataError, ConfigError) as exc:
        fail(str(exc))
    m = run.evaluation.metrics
    if json_out:
        print(json.dumps({**m, "component_auprc": run.evaluation.component_auprc, "mlflow_run_id": run.run_id}))
        return
    from rich.table import Table

    out_console = Console()
    where = (
        f"published split ({100 * m['test_normals_in_training']:.1f} % of its test normals are training images)"
        if split == "published"
        else f"seed {run.seed}"
    )
    out_console.print(
        f"holdout {holdout}, {where}: {m['n_test']} test images, {100 * m['anomaly_rate']:.1f} % anomalies",
        soft_wrap=True,
    )
    out_console.print(
        f"AUPRC [bold]{m['auprc']:.3f}[/]  AUROC {m['auroc']:.3f}  F1 {m['f1']:.3f}  "
        f"false alarms {100 * m['false_alarm_rate']:.1f} %  ({m['score_images_per_second']:.0f} images/s)"
    )
    table = Table(title="each component alone")
    table.add_column("component")
    table.add_column("AUPRC")
    table.add_column("AUROC")
    for name, value in sorted(run.evaluation.component_auprc.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{value:.3f}", f"{run.evaluation.component_auroc[name]:.3f}")
    out_console.print(table)
    if run.run_id:
        out_console.print(f"MLflow run: {run.run_id}")


@app.command()
def serve(
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Interface to bind; loopback only unless told otherwise (0.0.0.0 = all)."
    ),
    port: int = typer.Option(8000, help="TCP port."),
    steps: Optional[int] = typer.Option(None, help="Posterior Langevin steps K (default: the model's score.steps)."),
    max_items: int = typer.Option(1024, help="Most items in one request (more: 413)."),
    max_body_mb: float = typer.Option(32.0, help="Largest request body in MiB (more: 413)."),
    timeout: float = typer.Option(30.0, help="Seconds a batch may take to score (more: 503)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    threads: Optional[int] = typer.Option(
        None,
        help="Torch threads for scoring (default: torch's, one per core). "
        "Fewer leaves cores to the HTTP side and to other processes.",
    ),
    polarity: Optional[str] = typer.Option(
        None,
        help="Encoded images (PNG, JPEG): keep the pixels, or auto: invert gray dark-on-light ones (default: as "
        "the model was fitted, else keep).",
    ),
) -> None:
    """Serve the model over HTTP: POST /v1/score, GET /health, /v1/model, /metrics (Prometheus)."""
    import torch
    import uvicorn

    if threads is not None:
        if threads < 1:
            fail("--threads must be at least 1")
        torch.set_num_threads(threads)

    from jebm_od.serving.app import Limits, create_app, load_for_serving

    try:
        loaded, ref, seconds = load_for_serving(model)
        api = create_app(
            loaded,
            model_ref=ref,
            load_seconds=seconds,
            steps=steps,
            polarity=polarity or loaded.meta.get("polarity", "keep"),
            limits=Limits(max_items=max_items, max_body_bytes=int(max_body_mb * (1 << 20)), timeout_s=timeout),
        )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    _warn_steps_off_calibration(loaded, steps)
    console.print(
        f"serving [bold]{ref}[/] (loaded in {seconds:.2f} s) on http://{host}:{port}  "
        "- POST /v1/score, GET /health /v1/model /metrics"
    )
    uvicorn.run(api, host=host, port=port, log_level=log_level)


@app.command()
def calibrate(
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    data: Optional[str] = typer.Option(None, help="Training data (default: the one recorded in the model)."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Override score.false_alarm_rate."),
    reference_size: Optional[int] = typer.Option(
        None, min=0, help="Override score.reference_size: training images the latent kNN searches (0 = all)."
    ),
    steps: Optional[int] = typer.Option(
        None, help="Override score.steps: posterior Langevin steps K the model scores with from now on."
    ),
    step_size: Optional[float] = typer.Option(None, help="Override score.step_size (posterior Langevin)."),
    chains: Optional[int] = typer.Option(None, help="Override score.chains: posterior chains per input."),
    noise: Optional[bool] = typer.Option(
        None, "--noise/--no-noise", help="Override score.noise: Langevin noise in the posterior chains."
    ),
    data_dir: Optional[Path] = typer.Option(None),
) -> None:
    """Recompute calibration.json from the model's held-in validation data (never from anomaly labels).

    The score settings given are written into the model's config.json first, and the reference
    latents and the calibration are refitted with them: a model recalibrated with --steps 10 scores
    at K = 10 in score, evaluate and serve, on scales fitted at K = 10 (a copy logged to MLflow
    before keeps its own settings).
    """
    from outlier_jebm.checkpoint import save_model
    from outlier_jebm.config import ConfigError
    from outlier_jebm.data import DataError
    from outlier_jebm.pipeline import training_data_of
    from outlier_jebm.registry import is_model_uri
    from outlier_jebm.scoring import calibrate as calibrate_model

    if is_model_uri(model):  # it would recalibrate a downloaded copy and leave the registered model as it was
        fail(
            f"--model {model}: calibrate writes into a model directory, not into MLflow; download the model "
            "(mlflow artifacts download) and calibrate that directory"
        )
    loaded = _load_model_or_fail(model)
    try:  # the split fit made: same seed, validation share and training cap (read before anything is written)
        td = training_data_of(loaded, data=data, data_dir=data_dir)
    except DataError as exc:
        fail(str(exc))
    cfg = old_cfg = loaded.config
    overrides = {
        "false_alarm_rate": false_alarm_rate,
        "reference_size": reference_size,
        "steps": steps,
        "step_size": step_size,
        "chains": chains,
        "noise": noise,
    }
    if any(v is not None for v in overrides.values()):
        try:  # validated before anything is written
            cfg = cfg.with_overrides(score=overrides)
        except ConfigError as exc:
            fail(str(exc))
    loaded.config = cfg
    with console.status(f"calibrating at K = {cfg.score.steps} ..."):
        cal = calibrate_model(loaded, td.train, td.val, seed=cfg.train.seed)
    if cfg is not old_cfg:  # the settings are written once their calibration is (an interrupted run changes none)
        save_model(loaded.model, cfg, loaded.path, loaded.meta)
    console.print(
        f"calibrated on {len(td.val)} held-in images at K = {cal.score_steps}: threshold {cal.threshold:.3f} at "
        f"{100 * cal.false_alarm_rate:.1f} % false alarms -> {loaded.path / 'calibration.json'}",
        soft_wrap=True,
    )


app.command("bench")(bench)


if __name__ == "__main__":
    app()
