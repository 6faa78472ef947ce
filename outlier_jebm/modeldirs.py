"""Where models live: the default directory of a fit, the ``models/latest`` pointer, and what ``--model`` names."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

LATEST_POINTER = Path("models") / "latest"


def default_out_dir(data_name: str, holdout: int | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"{Path(data_name).name}-holdout{holdout}" if holdout is not None else Path(data_name).name
    return Path("models") / f"{tag}-{stamp}"


def remember_latest(out_dir: Path) -> None:
    LATEST_POINTER.parent.mkdir(parents=True, exist_ok=True)
    LATEST_POINTER.write_text(str(out_dir.resolve()) + "\n")


def latest_model_dir(pointer: Path = LATEST_POINTER) -> Path | None:
    """The model directory a ``latest`` pointer file names (as ``fit`` writes it), or None."""
    if pointer.is_file():
        path = Path(pointer.read_text(errors="replace").strip())
        return path if path.is_dir() else None
    return None


def resolve_model_dir(model: str | Path | None) -> Path:
    """``--model`` as given (a directory, a ``latest`` pointer file or an MLflow model URI), else the last
    model fitted here."""
    from .registry import fetch_model_dir, is_model_uri

    if is_model_uri(model):
        return fetch_model_dir(str(model))
    if model is not None:
        path = Path(model)
        if path.name == LATEST_POINTER.name and path.is_file():  # `--model models/latest`: follow the pointer
            target = latest_model_dir(path)
            if target is None:
                raise FileNotFoundError(f"{model}: the model directory it names no longer exists")
            return target
        return path
    latest = latest_model_dir()
    if latest is None:
        raise FileNotFoundError("no --model given and no model fitted from this directory yet: run `jebm-od fit` first")
    return latest
