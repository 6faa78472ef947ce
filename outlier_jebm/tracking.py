"""MLflow tracking: every fit and evaluation is a run in the embedded SQLite store by default."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image

if TYPE_CHECKING:
    from .calibration import Calibration
    from .train import FitResult

EXPERIMENT = "jebm-od"
REASON_CHARS = 300  # how much of MLflow's own message an error keeps (some run to pages)


class TrackingError(RuntimeError):
    """MLflow could not open the tracking store or record something in it; names the store and the reason."""


@contextlib.contextmanager
def mlflow_errors(uri: str, what: str) -> Iterator[None]:
    """Re-raise what MLflow (or the file system under it) raises while doing ``what`` as a ``TrackingError``."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # what MLflow's SQL stores raise as they open a database

    try:
        yield
    except (MlflowException, OSError, SQLAlchemyError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > REASON_CHARS:
            reason = reason[: REASON_CHARS - 3] + "..."
        raise TrackingError(f"MLflow tracking at {uri}: could not {what}: {reason}") from exc


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else ``mlflow.db`` (SQLite) in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


class Tracker:
    """A thin wrapper over one MLflow run; the library decides what is logged, MLflow stores it."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = EXPERIMENT, run_name: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri or default_tracking_uri()
        with mlflow_errors(self.uri, "start a run"):
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                location = None
                if self.uri.startswith("sqlite:///"):
                    # keep artifacts next to the database, not in whatever directory we run from
                    location = (Path(self.uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
                mlflow.create_experiment(experiment, artifact_location=location)
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id

    def errors(self, what: str):
        """A context in which MLflow's failures while doing ``what`` become a ``TrackingError``."""
        return mlflow_errors(self.uri, what)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v) for k, v in flatten(params).items()}
        with self.errors("log parameters"):
            self.mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with self.errors("log metrics"):
            self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()}, step=step)

    def log_series(self, key: str, values: list[float]) -> None:
        """One metric at steps 0, 1, ... in one call (a curve along something other than epochs)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("/", "_"), float(v), now, step) for step, v in enumerate(values)]
        with self.errors("log a metric series"):
            self.mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        with self.errors("log an image"):
            self.mlflow.log_image(image, artifact_file)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        with self.errors("log artifacts"):
            self.mlflow.log_artifacts(str(directory), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        with self.errors("log a file"):
            self.mlflow.log_dict(data, artifact_file)

    def log_figure(self, fig, artifact_file: str) -> None:
        with self.errors("log a figure"):
            self.mlflow.log_figure(fig, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        with self.errors("set tags"):
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        with self.errors("end the run"):
            self.mlflow.end_run(status=status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:  # the failure that ended the block is the one to report, not a second one while ending the run
            with contextlib.suppress(TrackingError):
                self.end("FAILED")


def end_failed(tracker: Tracker | None) -> None:
    """Mark the run FAILED, if there is one; a failure to do so is not reported over the one that caused it."""
    if tracker is not None:
        with contextlib.suppress(TrackingError):
            tracker.end("FAILED")


def log_fit_end(
    tracker: Tracker,
    out_dir: Path,
    t0: float,
    train_seconds: float,
    cal: Calibration,
    quality: dict[str, float] | None,
    result: FitResult,
    register: str | None,
) -> str:
    """What a tracked fit logs once its model is written and calibrated; returns the logged model's URI."""
    tracker.log_metrics(
        {
            "wall_seconds": time.perf_counter() - t0,
            "train_wall_seconds": train_seconds,
            "calibration_threshold": cal.threshold,
        }
    )
    if quality is not None:
        tracker.log_metrics({f"sample_{k}": v for k, v in quality.items()})
    for name, values in result.chains.items():  # the last epoch's chains, one point per Langevin step
        tracker.log_series(f"{name}_log_density", values)
    if result.stopped:
        tracker.set_tags({"stopped_early": result.stopped})
        tracker.log_metrics({"kept_epoch": result.epochs_done})
    tracker.log_dict(cal.to_dict(), "calibration.json")
    from .registry import log_pyfunc  # it imports MLflow's pyfunc: only when a fit is logged

    with tracker.errors("log the pyfunc model"):
        info = log_pyfunc(out_dir, registered_model_name=register)
    tracker.end()
    return info.model_uri
