"""The MLflow side of a model directory: log it as a pyfunc model, find it again from a URI.

A fitted model is logged MLflow-3 style (``mlflow.pyfunc.log_model(name="model", ...)``) as a
*model from code*: the model's Python code is the file ``outlier_jebm/io/pyfunc_model.py`` and its
only artifact is the model directory (``config.json``, ``weights.safetensors``,
``calibration.json``, reference latents). Nothing is pickled, so loading a logged model
never unpickles anything.

``--model`` everywhere takes a directory or an MLflow model URI (``models:/NAME/VERSION``,
``models:/NAME@alias``, ``models:/m-<id>``, ``runs:/<run id>/model``); a URI is downloaded
once per process into a temporary folder and read exactly like a directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE

PYFUNC_CODE = Path(__file__).resolve().parent / "io" / "pyfunc_model.py"
ARTIFACT_KEY = "model_dir"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
_downloaded: dict[tuple[str, str], Path] = {}


def is_model_uri(ref: str | Path | None) -> bool:
    return isinstance(ref, str) and ref.startswith(URI_SCHEMES)


def model_signature(component_names: list[str]):
    """Output schema only: the input is validated by the model itself, because MLflow's tensor
    schemas cannot accept both a 784-column ``dataframe_split`` and ``inputs`` of N x 28 x 28
    (nor, for a colour model, both S*S*3 columns and N x S x S x 3, and gray images beside them)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from .schema import RESULT_TYPES

    kinds = {"float64": "double", "int64": "long", "string": "string"}
    cols = [ColSpec(kinds[RESULT_TYPES[c]], c) for c in RESULT_TYPES]
    cols += [ColSpec("double", name) for name in component_names]
    return ModelSignature(inputs=None, outputs=Schema(cols))


def _pyfunc_kwargs(model_dir: str | Path) -> dict[str, Any]:
    """What MLflow needs to package a fitted model directory: the signature comes from the model itself."""
    from .checkpoint import load_model
    from .scoring import Scorer

    scorer = Scorer(load_model(model_dir))
    dim = scorer.config.model.data_dim  # S*S, or S*S*3 for a colour model (H, W, C order)
    example = np.zeros((2, dim), dtype=np.float32)
    example[1, : dim // 2] = 1.0
    return dict(
        python_model=str(PYFUNC_CODE),
        artifacts={ARTIFACT_KEY: str(Path(model_dir).resolve())},
        signature=model_signature(scorer.component_names),
        input_example=example,
        pip_requirements=_requirements(),
    )


def log_pyfunc(model_dir: str | Path, *, registered_model_name: str | None = None, name: str = "model") -> Any:
    """Log a model directory as a pyfunc model (a model from code, nothing pickled) in the active MLflow run.

    Parameters
    ----------
    model_dir : str or Path
        A calibrated model directory; it becomes the logged model's only artifact.
    registered_model_name : str, optional
        Also register the model under this name.
    name : str, default "model"
        The logged model's name in the run.

    Returns
    -------
    mlflow.models.model.ModelInfo
    """
    import mlflow

    return mlflow.pyfunc.log_model(name=name, registered_model_name=registered_model_name, **_pyfunc_kwargs(model_dir))


def save_pyfunc(model_dir: str | Path, path: str | Path) -> Path:
    """Save a model directory as a pyfunc model folder, without a tracking server.

    Parameters
    ----------
    model_dir : str or Path
        A calibrated model directory.
    path : str or Path
        A new folder for the pyfunc model (``mlflow models serve -m path``).

    Returns
    -------
    Path
        ``path``.
    """
    import mlflow

    mlflow.pyfunc.save_model(path=str(path), **_pyfunc_kwargs(model_dir))
    return Path(path)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("jebm-od", "torch", "numpy", "pandas", "safetensors", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def find_model_dir(root: Path) -> Path:
    """The model directory inside a downloaded MLflow model (or ``root`` itself)."""
    candidates = [root / "artifacts" / ARTIFACT_KEY, root]
    candidates += sorted(p.parent for p in root.rglob(CONFIG_FILE))
    for c in candidates:
        if (c / CONFIG_FILE).is_file() and (c / WEIGHTS_FILE).is_file():
            return c
    raise FileNotFoundError(f"{root}: no jebm-od model directory (config.json + weights.safetensors) in it")


def fetch_model_dir(uri: str, tracking_uri: str | None = None) -> Path:
    """Download an MLflow model URI (once per process) and return the model directory inside it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import default_tracking_uri

    tracking = tracking_uri or default_tracking_uri()
    key = (uri, tracking)
    if key in _downloaded and _downloaded[key].is_dir():
        return _downloaded[key]
    mlflow.set_tracking_uri(tracking)
    dst = Path(tempfile.mkdtemp(prefix="jebm-od-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri}: cannot fetch it from the MLflow store at {tracking} ({exc.message})") from exc
    model_dir = find_model_dir(local)
    _downloaded[key] = model_dir
    return model_dir
