"""The ``jebm-od`` command line: parse, call the library, present."""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .bench import bench
from .common import (
    check_device_or_fail,
    console,
    fail,
    load_config,
    load_model_or_fail,
    warn_off_calibration,
)
from .score import score

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
    settings: Optional[list[str]] = typer.Option(
        None,
        "--set",
        metavar="KEY=VALUE",
        help="Override one config field, repeatable: --set model.prior=gaussian --set model.z_dims=[16,8] "
        "(dotted paths, or bench's shorthands: prior, z_dims, epochs, ...). Applied after --config.",
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
    track: bool = typer.Option(
        True, help="Log the run and the pyfunc model to MLflow (--no-track: only the model directory is written)."
    ),
    polarity: str = typer.Option(
        "keep",
        help="Image files: keep the pixels as they are, or auto: invert gray dark-on-light images to light-on-dark "
        "(score them with the same choice).",
    ),
) -> None:
    """Train a detector on in-distribution data and log the run (and the pyfunc model) to MLflow."""
    from outlier_jebm.checkpoint import CheckpointError
    from outlier_jebm.config import Config, ConfigError
    from outlier_jebm.data import DataError
    from outlier_jebm.distributed import is_main_process
    from outlier_jebm.modeldirs import default_out_dir
    from outlier_jebm.pipeline import prepare_data, run_fit
    from outlier_jebm.tracking import TrackingError
    from outlier_jebm.train import MLE_ELBO_NOTE, TrainingDiverged, held_in_elbo_label

    # under torchrun every rank runs this command; rank 0 alone reports progress (errors come from any rank)
    main = is_main_process()
    # soft_wrap: each message stays one line at any width, in a terminal or a log file
    say = partial(console.print, soft_wrap=True) if main else (lambda *args, **kwargs: None)
    from outlier_jebm.config import default_config_path, for_vectors
    from outlier_jebm.tables import is_vector_source

    cfg = load_config(config or default_config_path("vector" if is_vector_source(data) else "image"))
    check_device_or_fail(device)
    if resume and out is None:
        fail("--resume needs --out pointing at the model directory to continue")
    if register and not track:
        fail("--register logs the model to MLflow: it cannot go with --no-track")
    if resume and settings:
        fail("--resume continues the saved model with its own config: --set cannot change it (fit a new model)")
    if settings:
        from outlier_jebm.bench import BenchError, apply_overrides

        from .bench_spec import parse_overrides

        try:
            cfg = apply_overrides(cfg, {k: v for item in settings for k, v in parse_overrides(item).items()})
        except BenchError as exc:
            fail(f"--set: {exc}")
    if resume:
        # the split is rebuilt exactly as the saved model's (its seed, validation share, training cap and
        # polarity), whatever --config, --seed or --max-train say: otherwise training would go on on another split
        from outlier_jebm.checkpoint import CheckpointError, read_config

        try:
            saved, saved_meta = read_config(out)
        except CheckpointError as exc:
            fail(str(exc))
        ignored = [
            f"{name} {given}"
            for name, given, kept in (
                ("--seed", seed, saved.train.seed),
                ("--max-train", max_train, saved_meta.get("max_train", saved.train.max_train)),
            )
            if given is not None and given != kept
        ]
        if ignored and main:
            console.print(
                f"[yellow]warning:[/] --resume keeps the saved model's split: {escape(', '.join(ignored))} ignored",
                soft_wrap=True,
            )
        cfg, seed = saved, None
        max_train = saved_meta.get("max_train", saved.train.max_train)
        polarity = saved_meta.get("polarity", polarity)
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
        f"training on [bold]{len(td.train)}[/] {'vectors' if cfg.model.is_vector else 'images'} of {escape(td.name)}"
        + (f" (digit {holdout} held out)" if holdout is not None else "")
        + f", {len(td.val)} held-in for validation; model -> {escape(str(out_dir))}"
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

    def on_start(n_epochs: int, steps: int, trained: Config) -> None:
        state["steps"] = steps
        state["scheme"] = trained.train.scheme  # under --resume the saved model's, which may not be --config's
        state["task"] = progress.add_task(
            "fit", total=n_epochs * steps, epoch=f"1/{n_epochs}", loss=0.0, recon=0.0, gap=0.0
        )
        state["epochs"] = n_epochs
        if not resume and n_epochs > cfg.train.epochs:  # an --epochs 1 that silently trained 125 surprised users
            say(
                f"{n_epochs} epochs of {steps} steps: train.min_steps ({trained.train.min_steps}) raises the "
                f"{cfg.train.epochs} asked for; --set train.min_steps=0 trains exactly that many"
            )

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
        nan = float("nan")
        elbo = held_in_elbo_label(state["scheme"])
        progress.console.print(
            f"epoch {epoch + 1}: loss {m['loss']:.1f}  recon {m['recon']:.1f}  "
            f"val recon {m.get('val_recon', nan):.1f}  {elbo} {m.get('val_neg_elbo', nan):.1f}  "
            f"f post/prior {m['f_posterior']:+.2f}/{m.get('f_prior', 0.0):+.2f}  {m['images_per_second']:.0f} img/s  {m['seconds_per_epoch']:.0f} s",
            soft_wrap=True,  # one line per epoch at any width, in a terminal or a log file
        )

    try:
        with progress:
            summary = run_fit(
                cfg,
                td,
                out_dir=out_dir,
                device=device,
                tracking_uri=tracking_uri,
                track=track,
                resume=resume,
                register=register,
                on_step=on_step,
                on_start=on_start,
                on_epoch_end=on_epoch_end,
            )
    except TrainingDiverged as exc:
        fail(f"training stopped: {exc}", code=3)
    except TrackingError as exc:
        fail(f"{exc}; --tracking-uri names another store, --no-track trains without MLflow", code=1)
    except (CheckpointError, ValueError) as exc:
        fail(str(exc))
    if not main:
        return
    last = summary.history[-1] if summary.history else {}
    scheme = state.get("scheme", cfg.train.scheme)
    if scheme == "mle" and summary.history:
        say(MLE_ELBO_NOTE)
    if summary.stopped:
        console.print(f"[yellow]breakdown guard:[/] {escape(summary.stopped)}", soft_wrap=True)
    console.print(
        f"[green]done[/] in {summary.wall_seconds:.0f} s "
        f"({last.get('images_per_second', 0):.0f} images/s in training, "
        + (
            f"the model is epoch {summary.epochs_done}'s)"
            if summary.stopped
            else f"{held_in_elbo_label(scheme)} {last.get('val_neg_elbo', float('nan')):.1f}, val recon {last.get('val_recon', float('nan')):.1f})"
        ),
        soft_wrap=True,
    )
    console.print(f"model:      [bold]{escape(str(summary.out_dir))}[/]", soft_wrap=True)
    if summary.sample_quality:
        _print_sample_quality(summary.sample_quality)
    if summary.run_id:
        console.print(f"MLflow run: [bold]{summary.run_id}[/] at {summary.tracking_uri}", soft_wrap=True)
    if summary.model_uri:
        console.print(
            f"MLflow model: [bold]{summary.model_uri}[/]"
            + (f" (registered as [bold]{register}[/])" if register else ""),
            soft_wrap=True,
        )


@app.command()
def sample(
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    out: Path = typer.Option(Path("samples.png"), help="Where to write the grid (PNG)."),
    kind: str = typer.Option("prior", help="prior, hierarchical, or chains (short-run vs long-run)."),
    n: int = typer.Option(64, help="Number of prior samples (--kind prior; hierarchical and chains draw 8 rows)."),
    steps: Optional[int] = typer.Option(
        None, help="Prior Langevin steps (default: the model's train.sample_steps, else its training value)."
    ),
    seed: Optional[int] = typer.Option(
        None,
        help="Seed of the sampler (and of --metrics' classifier and image pick); default: the model's train.seed, "
        "so that --metrics measures the samples as its fit did.",
    ),
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

    # everything the options decide is checked before the model loads
    if kind not in ("prior", "hierarchical", "chains"):
        fail(f"--kind must be prior, hierarchical or chains, got {kind!r}")
    if n < 1:
        fail(f"--n must be at least 1, got {n}")
    if out.is_dir():
        fail(f"--out {out} is a folder; give a file name such as {out / 'samples.png'}")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        fail(f"--out {out}: the grid is an image; end the name in .png (or .jpg, .webp, .bmp, .tif)")
    loaded = load_model_or_fail(model)
    if loaded.config.model.is_vector:
        fail(f"{loaded.path.name}: a vector model's samples are not images; there is no grid to draw")
    seed = loaded.config.train.seed if seed is None else seed
    torch.manual_seed(seed)
    pr = loaded.config.train.prior_langevin
    k = steps if steps is not None else loaded.config.train.sampler_steps
    if kind == "prior":
        grid = image_grid(prior_samples(loaded.model, n, steps=k, step_size=pr.step_size), 8)
    elif kind == "hierarchical":
        grid = image_grid(hierarchical_samples(loaded.model, 8, steps=k, step_size=pr.step_size), 8)
    else:
        grid = sample_figures(loaded.model, steps=k, step_size=pr.step_size)["short_vs_long_run"]
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    console.print(f"wrote {escape(str(out))}", soft_wrap=True)
    if metrics:
        from outlier_jebm.data import DataError
        from outlier_jebm.sample_quality import model_sample_quality

        try:
            quality = model_sample_quality(loaded, n=metrics_n, data=data, data_dir=data_dir, steps=k, seed=seed)
        except DataError as exc:
            fail(str(exc))
        _print_sample_quality(quality)


def _print_sample_quality(quality: dict) -> None:
    console.print(
        f"FID (in-project LeNet features, not Inception FID): {quality['fid_lenet']:.3f} "
        f"({int(quality['samples'])} samples, {int(quality['steps'])} prior Langevin steps)",
        soft_wrap=True,
    )
    console.print(
        f"LeNet mean confidence: samples {quality['lenet_confidence']:.3f}, "
        f"training images {quality['lenet_confidence_training']:.3f} "
        f"(LeNet accuracy {quality['lenet_accuracy']:.3f})",
        soft_wrap=True,
    )


app.command()(score)  # cli/score.py; registered here to keep the help's order


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(
        None, help="Model directory or MLflow model URI, e.g. models:/NAME/1 (default: the last fitted model)."
    ),
    data: Optional[str] = typer.Option(
        None,
        help="Labelled data: mnist, digits, a named vector set (breast_cancer, wine, digits64, mnist784) or a "
        ".npz with labels (default: the data the model was trained on, when it is known by name).",
    ),
    holdout: Optional[int] = typer.Option(
        None, help="Held-out digit (default: the one the model was trained without)."
    ),
    seed: Optional[int] = typer.Option(
        None, help="Split seed (default: the model's training seed, so test stays unseen)."
    ),
    steps: Optional[int] = typer.Option(None, help="Posterior Langevin steps K (default: the model's score.steps)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data_dir: Optional[Path] = typer.Option(None, help="Where MNIST files are looked for and cached."),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    track: bool = typer.Option(True, help="Log the metrics and curves as an MLflow run (--no-track: print them only)."),
    split: Optional[str] = typer.Option(
        None,
        help="clean (one permutation, no overlap) or published (the papers' loaders' MNIST split, whose test "
        "normals are mostly training images); default: the split the model was trained on.",
    ),
) -> None:
    """AUPRC, AUROC, F1 and false-alarm rate on the hold-out protocol's test part."""
    import json

    from outlier_jebm.config import ConfigError
    from outlier_jebm.data import DataError
    from outlier_jebm.pipeline import run_evaluate
    from outlier_jebm.tracking import TrackingError

    check_device_or_fail(device)
    loaded = load_model_or_fail(model)
    if loaded.calibration is None:
        fail(f"{loaded.path}: the model has no calibration.json; refit it")
    # the data and split default to the model's record, so that its test part stays unseen
    from outlier_jebm.data import is_named_source

    recorded = loaded.meta.get("data")
    if data is None and recorded is not None and not is_named_source(recorded):
        fail(f"the model records its training data by the name {recorded!r} alone: pass --data with its path")
    for option, given, kept in (
        ("--data", data and Path(data).name.lower(), recorded and recorded.lower()),
        ("--split", split, loaded.meta.get("split")),
    ):
        if given is not None and kept is not None and given != kept:
            console.print(
                f"[yellow]warning:[/] the model was trained on {option} {escape(kept)}, evaluated on {escape(given)}",
                soft_wrap=True,
            )
    data = data or recorded or "mnist"
    split = split or loaded.meta.get("split") or "clean"
    holdout = holdout if holdout is not None else loaded.meta.get("holdout")
    if holdout is None:
        fail("--holdout is needed: the model was not trained with a held-out digit")
    warn_off_calibration(loaded, steps)
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
                track=track,
                split=split,
            )
    except (DataError, ConfigError) as exc:
        fail(str(exc))
    except TrackingError as exc:
        fail(f"{exc}; --no-track evaluates without MLflow", code=1)
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
        f"false alarms {100 * m['false_alarm_rate']:.1f} %  ({m['score_images_per_second']:.0f} images/s)",
        soft_wrap=True,
    )
    table = Table(title="each component alone")
    table.add_column("component")
    table.add_column("AUPRC")
    table.add_column("AUROC")
    for name, value in sorted(run.evaluation.component_auprc.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{value:.3f}", f"{run.evaluation.component_auroc[name]:.3f}")
    out_console.print(table)
    if run.run_id:
        out_console.print(f"MLflow run: {run.run_id}", soft_wrap=True)


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
    timeout: float = typer.Option(
        30.0, help="Seconds a request may wait for the scoring thread and be scored (more: 503)."
    ),
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
    warn_off_calibration(loaded, steps)
    console.print(
        f"serving [bold]{escape(str(ref))}[/] (loaded in {seconds:.2f} s) on http://{host}:{port}  "
        "- POST /v1/score, GET /health /v1/model /metrics",
        soft_wrap=True,
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
    shifts: Optional[int] = typer.Option(
        None,
        help="Override score.shifts: also match each image moved this many pixels up, down, left and right in the "
        "latent_knn and latent_knn_cos (0 = off; five encodings per image instead of one).",
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Where MNIST files are looked for and cached."),
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
    loaded = load_model_or_fail(model)
    try:  # the split fit made: same seed, validation share and training cap (read before anything is written)
        td = training_data_of(loaded, data=data, data_dir=data_dir)
    except DataError as exc:
        fail(str(exc))
    overrides = {
        "false_alarm_rate": false_alarm_rate,
        "reference_size": reference_size,
        "steps": steps,
        "step_size": step_size,
        "chains": chains,
        "noise": noise,
        "shifts": shifts,
    }
    try:  # validated before anything is written; options not given (None) are skipped
        cfg = loaded.config.with_overrides(score=overrides)
    except ConfigError as exc:
        fail(str(exc))
    changed = cfg != loaded.config
    loaded.config = cfg
    with console.status(f"calibrating at K = {cfg.score.steps} ..."):
        cal = calibrate_model(loaded, td.train, td.val, seed=cfg.train.seed)
    if changed:  # written after their calibration: an interrupted run leaves the old settings, which score warns of
        save_model(loaded.model, cfg, loaded.path, loaded.meta)
    console.print(
        f"calibrated on {len(td.val)} held-in images at K = {cal.score_steps}: threshold {cal.threshold:.3f} at "
        f"{100 * cal.false_alarm_rate:.1f} % false alarms -> {loaded.path / 'calibration.json'}",
        soft_wrap=True,
    )


app.command("bench")(bench)


if __name__ == "__main__":
    app()
