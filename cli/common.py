"""What every command shares: the error console, failing with a message, reading a config."""

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
