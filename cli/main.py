"""The ``jebm-od`` command line: parse, call the library, present."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    help="Image anomaly detection with a joint latent-space EBM prior on a multi-layer generator.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _load_config(path: Optional[Path]):
    from outlier_jebm.config import Config, ConfigError, default_config_path

    try:
        return Config.from_yaml(path or default_config_path())
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def fit(
    data: str = typer.Option("mnist", help="mnist, digits, a folder of images, or a .npy/.npz file."),
    holdout: Optional[int] = typer.Option(None, help="Digit held out as the anomaly class (hold-out protocol)."),
    config: Optional[Path] = typer.Option(None, help="YAML config (default: configs/mnist.yaml)."),
    epochs: Optional[int] = typer.Option(None, help="Override train.epochs."),
    max_train: Optional[int] = typer.Option(None, help="Use at most this many training images."),
    seed: Optional[int] = typer.Option(None, help="Override train.seed (split, init, shuffling)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Model directory (default: models/<data>-holdout<D>-<time>)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."),
    data_dir: Optional[Path] = typer.Option(None, help="Where MNIST files are looked for and cached."),
    resume: bool = typer.Option(False, help="Continue training the model in --out from its last epoch."),
) -> None:
    """Train a detector on in-distribution data and log the run to MLflow."""
    from outlier_jebm.checkpoint import CheckpointError
    from outlier_jebm.config import ConfigError
    from outlier_jebm.data import DataError
    from outlier_jebm.pipeline import default_out_dir, prepare_data, run_fit
    from outlier_jebm.train import TrainingDiverged

    cfg = _load_config(config)
    if resume and out is None:
        _fail("--resume needs --out pointing at the model directory to continue")
    try:
        cfg = cfg.with_overrides(train={"epochs": epochs, "seed": seed, "max_train": max_train})
        with console.status(f"loading {data} ..."):
            td = prepare_data(data, holdout=holdout, seed=cfg.train.seed, val_fraction=cfg.train.val_fraction,
                              max_train=cfg.train.max_train, image_size=cfg.model.image_size, data_dir=data_dir)
    except (DataError, ConfigError) as exc:
        _fail(str(exc))
    out_dir = out or default_out_dir(td.name, holdout)
    console.print(f"training on [bold]{len(td.train)}[/] images of {td.name}"
                  + (f" (digit {holdout} held out)" if holdout is not None else "")
                  + f", {len(td.val)} held-in for validation; model -> {out_dir}")
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.1f}  recon {task.fields[recon]:.1f}  f-gap {task.fields[gap]:+.2f}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )
    state: dict = {}

    def on_start(n_epochs: int, steps: int) -> None:
        state["steps"] = steps
        state["task"] = progress.add_task("fit", total=n_epochs * steps, epoch=f"1/{n_epochs}", loss=0.0, recon=0.0, gap=0.0)
        state["epochs"] = n_epochs

    def on_step(epoch: int, step: int, stats: dict) -> None:
        if step % 10 == 0 or step == state["steps"] - 1:
            progress.update(state["task"], completed=epoch * state["steps"] + step + 1,
                            epoch=f"{epoch + 1}/{state['epochs']}", loss=stats["loss"], recon=stats["recon"],
                            gap=stats.get("f_gap", 0.0))

    try:
        with progress:
            summary = run_fit(cfg, td, out_dir=out_dir, device=device, tracking_uri=tracking_uri, resume=resume,
                              on_step=on_step, on_start=on_start)
    except TrainingDiverged as exc:
        _fail(f"training stopped: {exc}", code=3)
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))
    last = summary.history[-1] if summary.history else {}
    console.print(f"[green]done[/] in {summary.wall_seconds:.0f} s "
                  f"({last.get('images_per_second', 0):.0f} images/s in training, "
                  f"val -ELBO {last.get('val_neg_elbo', float('nan')):.1f})")
    console.print(f"model:      [bold]{summary.out_dir}[/]")
    if summary.run_id:
        console.print(f"MLflow run: [bold]{summary.run_id}[/] at {summary.tracking_uri}")


@app.command()
def sample(
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the last fitted model)."),
    out: Path = typer.Option(Path("samples.png"), help="Where to write the grid (PNG)."),
    kind: str = typer.Option("prior", help="prior, hierarchical, or chains (short-run vs long-run)."),
    n: int = typer.Option(64, help="Number of prior samples."),
    steps: Optional[int] = typer.Option(None, help="Prior Langevin steps (default: the training value)."),
    seed: int = typer.Option(0),
) -> None:
    """Draw samples from the learned prior and write them as an image grid."""
    import torch

    from outlier_jebm.checkpoint import CheckpointError, load_model
    from outlier_jebm.pipeline import latest_model_dir
    from outlier_jebm.sampling import hierarchical_samples, prior_samples, sample_figures
    from outlier_jebm.viz import image_grid

    path = model or latest_model_dir()
    if path is None:
        _fail("no model given and none fitted here yet: run `jebm-od fit` or pass --model DIR")
    try:
        loaded = load_model(path)
    except CheckpointError as exc:
        _fail(str(exc))
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
        _fail(f"--kind must be prior, hierarchical or chains, got {kind!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
