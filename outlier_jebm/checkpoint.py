"""Model directories: ``config.json`` + ``weights.safetensors`` (+ ``calibration.json``).

Loading never unpickles: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Config, ConfigError
from .fileio import atomic_path, write_text_atomic
from .model import JointEBM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
CALIBRATION_FILE = "calibration.json"
TRAIN_STATE_FILE = "train_state.safetensors"


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or inconsistent."""


@dataclass
class LoadedModel:
    model: JointEBM
    config: Config
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    path: Path | None = None


def save_model(model: JointEBM, config: Config, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write a model directory: ``weights.safetensors`` and ``config.json``, each file atomically.

    A crash never leaves half a weights file; nothing is pickled.

    Parameters
    ----------
    model : JointEBM
        The model whose weights are written (moved to CPU for writing).
    config : Config
        Its configuration, stored beside the weights.
    directory : str or Path
        The model directory, created if missing.
    meta : dict, optional
        What the model was trained on (data, hold-out, split, seed, ...), stored in ``config.json``.

    Returns
    -------
    Path
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    payload = {"format": "jebm-od/1", "version": __version__, "config": config.to_dict(), "meta": meta or {}}
    write_text_atomic(directory / CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True))
    return directory


def save_calibration(directory: str | Path, calibration: dict[str, Any]) -> None:
    write_text_atomic(Path(directory) / CALIBRATION_FILE, json.dumps(calibration, indent=2, sort_keys=True))


def read_config(directory: str | Path) -> tuple[Config, dict[str, Any]]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a jebm-od model directory?")
    try:
        payload = json.loads(path.read_text())
        config = Config.from_dict(payload["config"])
    except (json.JSONDecodeError, KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path}: unreadable model config ({exc})") from None
    return config, payload.get("meta", {})


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model directory (safetensors weights and JSON, never a pickle).

    Parameters
    ----------
    directory : str or Path
        A directory written by ``save_model`` (by ``jebm-od fit``).
    device : str or torch.device, default "cpu"
        Where the model goes; a model trained on GPU loads on CPU.

    Returns
    -------
    LoadedModel
        The model in eval mode, its config, meta, calibration (None if not calibrated) and path.

    Raises
    ------
    CheckpointError
        If the directory, its config or its weights are missing or unreadable.
    """
    directory = Path(directory)
    config, meta = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    model = JointEBM(config.model)
    try:
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state)
    except Exception as exc:  # safetensors raises its own types for corrupt headers
        raise CheckpointError(f"{weights}: cannot load weights ({exc})") from None
    model.to(device).eval()
    calibration = None
    cal_path = directory / CALIBRATION_FILE
    if cal_path.is_file():
        calibration = json.loads(cal_path.read_text())
    return LoadedModel(model=model, config=config, meta=meta, calibration=calibration, path=directory)


def save_train_state(directory: Path, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """Adam moments as safetensors plus the loop position as JSON, for ``--resume``."""
    tensors: dict[str, torch.Tensor] = {}
    for pid, pstate in optimizer.state_dict()["state"].items():
        for name, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pid}.{name}"] = t.detach().cpu().contiguous()
    with atomic_path(directory / TRAIN_STATE_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(directory / "train_state.json", json.dumps(progress, indent=2))


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state_file = directory / TRAIN_STATE_FILE
    progress_file = directory / "train_state.json"
    if not state_file.is_file() or not progress_file.is_file():
        raise CheckpointError(f"{directory}: no training state to resume from")
    tensors = load_file(str(state_file))
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return json.loads(progress_file.read_text())
