"""What every command shares: the error console, failing with a message, reading a config or a model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` and exit with ``code`` (2: a usage error)."""
    # soft_wrap: a path or a reason stays on one line whatever the terminal's width (copyable);
    # escape: a "[...]" in a path or a message is text, not rich markup
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def load_config(path: Optional[Path]):
    """The config at ``path`` (default: the packaged image config), or exit with the reason."""
    from outlier_jebm.config import Config, ConfigError, default_config_path

    try:
        return Config.from_yaml(path or default_config_path())
    except ConfigError as exc:
        fail(str(exc))


def check_device_or_fail(device: str) -> None:
    """Refuse an unusable ``--device`` (unknown, or cuda without a GPU) before any data is loaded."""
    from outlier_jebm.train import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        fail(str(exc))


def load_model_or_fail(model: Optional[str], device: str = "cpu"):
    from outlier_jebm.checkpoint import CheckpointError, load_model
    from outlier_jebm.modeldirs import resolve_model_dir

    try:
        return load_model(resolve_model_dir(model), device=device)
    except (CheckpointError, FileNotFoundError) as exc:
        fail(str(exc))


def warn_off_calibration(loaded, steps: Optional[int]) -> None:
    """Say so when the K scored at (--steps, else the model's score.steps), or score.shifts, is not the
    calibration's."""
    shifts = ((loaded.calibration or {}).get("extra") or {}).get("score_shifts", 0)
    if loaded.calibration and shifts != loaded.config.score.shifts:  # e.g. an interrupted calibrate --shifts
        console.print(
            f"[yellow]warning:[/] the calibration was fitted with score.shifts {shifts}, the model's config says "
            f"{loaded.config.score.shifts}. `jebm-od calibrate --shifts {loaded.config.score.shifts}` refits it.",
            soft_wrap=True,
        )
    fitted = (loaded.calibration or {}).get("score_steps")
    steps = loaded.config.score.steps if steps is None else steps
    if steps < 0 or fitted is None or steps == fitted:
        return
    console.print(
        f"[yellow]warning:[/] the calibration was fitted at K = {fitted}; at K = {steps} the score, threshold and "
        f"kNN reference keep K = {fitted}'s scales. `jebm-od calibrate --steps {steps}` refits them.",
        soft_wrap=True,
    )
