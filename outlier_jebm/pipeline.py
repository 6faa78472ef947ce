"""End-to-end jobs that the CLI, the benchmark and the detector share: data -> model -> MLflow."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import LoadedModel, load_model, read_config
from .config import Config
from .data import DataError, check_polarity, holdout_split, is_named_source, load_dataset
from .distributed import ProcessGroup
from .evaluate import Evaluation
from .model import JointEBM
from .modeldirs import remember_latest
from .sampling import reconstructions, sample_figures
from .scoring import calibrate
from .tracking import Tracker, TrackingError, end_failed, log_fit_end
from .train import StepHook, fit, planned_epochs, resolve_device, seed_everything, steps_per_epoch


@dataclass
class TrainingData:
    train: np.ndarray  # (n, H, W) or (n, H, W, 3) in [0, 1]
    val: np.ndarray
    name: str
    holdout: int | None
    test: np.ndarray | None = None
    test_is_anomaly: np.ndarray | None = None
    split: str = "clean"  # clean | published (splits.py)
    test_in_train: float = 0.0  # share of the test part's normals that are training images
    train_labels: np.ndarray | None = None  # class labels of ``train`` where the source has them
    max_train: int | None = None
    polarity: str = "keep"  # how image files were read (data.decode_image); scoring defaults to the same
    feature_names: list[str] | None = None  # a vector table's column names (none for arrays): scoring matches them


def prepare_data(
    source: str,
    *,
    holdout: int | None,
    seed: int,
    val_fraction: float,
    max_train: int | None = None,
    image_size: int = 28,
    data_dir: str | Path | None = None,
    channels: int = 1,
    data_kind: str = "image",
    split: str = "clean",
    polarity: str = "keep",
) -> TrainingData:
    """Load a dataset and apply the hold-out protocol (or a plain train/validation split).

    Parameters
    ----------
    source : str
        ``"mnist"``, ``"digits"``, an image folder, a ``.npy``/``.npz`` file, or vectors: a
        ``.csv``/``.parquet`` table or a named vector set (see ``tables``).
    holdout : int or None
        The class held out as anomalies; None trains on everything (no test part).
    seed : int
        Seed of the split's shuffle.
    val_fraction : float
        Share of the training part held in for calibration.
    max_train : int, optional
        Keep at most this many training images.
    image_size : int, default 28
        Side the images are resized to.
    data_dir : str or Path, optional
        Where MNIST is looked for and cached.
    channels : int, default 1
        The model's channels: 1 reads grayscale, 3 reads RGB.
    data_kind : str, default "image"
        ``"vector"`` reads feature vectors, which come out as (n, d) arrays; images come out as
        (n, H, W[, C]).
    split : str, default "clean"
        ``"clean"`` is ``data.holdout_split`` (one permutation, no overlap); ``"published"``
        replays the published loaders' MNIST split (``splits``; most of its test normals are
        training images, ``test_in_train`` says how many).
    polarity : str, default "keep"
        How image files are read (``"keep"`` or ``"auto"``, see ``data.decode_image``).

    Returns
    -------
    TrainingData
        The train, validation and test parts, with the test part's anomaly labels.

    Raises
    ------
    DataError
        If the source is missing or malformed, or the split does not apply to it.
    """
    from .splits import SPLITS, published_holdout_split

    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "published" and (holdout is None or str(source).strip().lower() != "mnist"):
        raise DataError("the published split is MNIST's hold-out protocol: it needs --data mnist and --holdout")
    from .tables import feature_names_of, is_vector_source, load_vector_dataset, vector_holdout_split

    vectors = data_kind == "vector" or is_vector_source(source)
    if vectors:
        ds = load_vector_dataset(source, data_dir=data_dir)
    else:
        ds = load_dataset(source, data_dir=data_dir, image_size=image_size, channels=channels, polarity=polarity)
    check_polarity(polarity)  # for every source, not only the image files it applies to
    leaked = 0.0
    train_labels = None
    if holdout is not None and split == "published":
        parts, leaked = published_holdout_split(ds, holdout, val_fraction=val_fraction)
        train, val, test, flags = parts.train, parts.val, parts.test, parts.test_is_anomaly
        train_labels = parts.train_labels
    elif holdout is not None:
        split_fn = vector_holdout_split if vectors else holdout_split
        parts = split_fn(ds, holdout, seed=seed, val_fraction=val_fraction)
        train, val, test, flags = parts.train, parts.val, parts.test, parts.test_is_anomaly
        train_labels = getattr(parts, "train_labels", None)
    else:
        order = np.random.default_rng(seed).permutation(len(ds.images))
        n_val = max(1, int(round(val_fraction * len(order))))
        train, val = ds.images[order[n_val:]], ds.images[order[:n_val]]
        test = flags = None
        if not vectors and ds.labels is not None:
            train_labels = np.asarray(ds.labels)[order[n_val:]]
    if max_train is not None and max_train < len(train):
        keep = np.random.default_rng(seed + 1).choice(len(train), size=max_train, replace=False)
        train = train[np.sort(keep)]
        train_labels = None if train_labels is None else train_labels[np.sort(keep)]
    return TrainingData(
        train=train,
        val=val,
        name=ds.name,
        holdout=holdout,
        test=test,
        test_is_anomaly=flags,
        split=split,
        test_in_train=leaked,
        train_labels=train_labels,
        max_train=max_train,
        polarity=polarity,
        feature_names=feature_names_of(ds) if vectors else None,
    )


@dataclass
class FitSummary:
    out_dir: Path
    run_id: str | None
    tracking_uri: str | None
    wall_seconds: float
    history: list[dict[str, float]]
    model_uri: str | None = None
    sample_quality: dict[str, float] | None = None  # FID (in-project LeNet features) etc., where labels exist
    stopped: str = ""  # the breakdown guard's message when it stopped training early (train.max_recon_rise)
    epochs_done: int = 0  # epochs of the model's weights


def run_fit(
    config: Config,
    data: TrainingData,
    *,
    out_dir: Path,
    device: str = "auto",
    tracking_uri: str | None = None,
    track: bool = True,
    resume: bool = False,
    on_step: StepHook | None = None,
    on_start: Callable[[int, int, Config], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    register: str | None = None,
    remember: bool = True,
) -> FitSummary:
    """Train on ``data``, calibrate on its validation part, and log the run to MLflow.

    The model directory is written after every epoch, so a stopped or failed run keeps its last
    good epoch. Under torchrun every rank trains and rank 0 alone writes, calibrates and tracks.

    Parameters
    ----------
    config : Config
        The model, training and scoring settings (``train.epochs`` may be raised to reach
        ``train.min_steps`` on small data).
    data : TrainingData
        From ``prepare_data``; only its train and validation parts are read.
    out_dir : Path
        The model directory to write.
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    tracking_uri : str, optional
        MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or the embedded SQLite store).
    track : bool, default True
        Log the run, its metrics and the pyfunc model to MLflow.
    resume : bool, default False
        Continue the model in ``out_dir`` from its last epoch.
    on_step, on_start, on_epoch_end : callable, optional
        Progress hooks: per step; once with (epochs, steps per epoch, the config trained: under ``resume``
        the saved model's); and per epoch with its metrics.
    register : str, optional
        Also register the logged model under this name (needs ``track``).
    remember : bool, default True
        Record ``out_dir`` as the latest model, the default of ``score`` and ``serve``.

    Returns
    -------
    FitSummary
        The model directory, the MLflow run and model URI, wall time, per-epoch history and
        the sample-quality figures where the training images have labels.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model_uri = None
    if register is not None and not track:
        raise ValueError("registering a model needs MLflow tracking")
    # under torchrun every rank trains; rank 0 alone tracks, writes the model, calibrates and registers
    group = ProcessGroup.join(dev)
    dev = group.device
    track = track and group.is_main
    if resume:
        # the model's own config, trained on up to the number of epochs asked for now
        saved, _ = read_config(out_dir)
        config = saved.with_overrides(train={"epochs": config.train.epochs})
    if not resume:
        epochs = planned_epochs(config, len(data.train), group.world_size)
        if epochs != config.train.epochs:
            config = config.with_overrides(train={"epochs": epochs})
    seed_everything(config.train.seed)
    model = JointEBM(config.model)
    if resume:
        model.load_state_dict(load_model(out_dir).model.state_dict())
    meta = {
        "data": data.name,
        "holdout": data.holdout,
        "split": data.split,
        "max_train": data.max_train,
        "polarity": data.polarity,
        "feature_names": data.feature_names,
        "n_train": int(len(data.train)),
        "n_val": int(len(data.val)),
        "image_size": config.model.image_size,
        "device": str(dev),
        "world_size": group.world_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tracker = None  # started with the training below: one failure path ends both
    probe = data.val[:8] if len(data.val) else data.train[:8]

    def on_epoch(epoch: int, metrics: dict[str, float], m: JointEBM) -> None:
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if tracker is None:
            return
        tracker.log_metrics(metrics, step=epoch + 1)
        last = epoch + 1 == config.train.epochs
        pictures = not config.model.is_vector  # sample grids and reconstructions are for images
        if pictures and ((epoch + 1) % max(config.train.sample_every, 1) == 0 or last):
            pr = config.train.prior_langevin
            steps = config.train.sampler_steps
            for name, image in sample_figures(m, steps=steps, step_size=pr.step_size).items():
                tracker.log_image(image, f"samples/epoch{epoch + 1:03d}_{name}.png")
            tracker.log_image(reconstructions(m, probe), f"samples/epoch{epoch + 1:03d}_reconstructions.png")

    try:
        tracker = Tracker(tracking_uri, run_name=out_dir.name) if track else None
        if tracker is not None:
            meta["mlflow_run_id"] = tracker.run_id
            tracker.log_params(config.to_dict())
            tracker.log_params(
                {
                    "data": data.name,
                    "holdout": data.holdout,
                    "n_train": len(data.train),
                    "device": str(dev),
                    "world_size": group.world_size,
                    "dist_backend": group.backend or "none",
                }
            )
        if on_start is not None and group.is_main:
            steps = steps_per_epoch(len(data.train), config.train.batch_size, group.world_size)
            on_start(config.train.epochs, steps, config)  # the config trained: under --resume, the model's own
        result = fit(
            model,
            config,
            data.train,
            data.val,
            out_dir,
            device=dev,
            meta=meta,
            resume=resume,
            on_step=on_step,
            on_epoch=on_epoch,
        )
    except BaseException:
        group.close(wait=False)
        end_failed(tracker)
        raise
    group.close()
    if not group.is_main:
        return FitSummary(
            out_dir=out_dir,
            run_id=None,
            tracking_uri=None,
            wall_seconds=time.perf_counter() - t0,
            history=result.history,
            stopped=result.stopped,
            epochs_done=result.epochs_done,
        )
    train_seconds = time.perf_counter() - t0
    from .sample_quality import fit_sample_quality

    try:
        loaded = load_model(out_dir, device=dev)
        cal = calibrate(loaded, data.train, data.val, seed=config.train.seed, device=dev)
        quality = fit_sample_quality(loaded.model, config, data)
        if remember:  # False for the benchmark: its models are not the user's last fit
            remember_latest(out_dir)
        if tracker is not None:
            model_uri = log_fit_end(tracker, out_dir, t0, train_seconds, cal, quality, result, register)
    except TrackingError as exc:  # only the logging above can raise it: the model itself is done
        end_failed(tracker)
        raise TrackingError(
            f"{exc} (the model in {out_dir} is complete and calibrated; its MLflow run is not)"
        ) from exc
    except BaseException:
        end_failed(tracker)
        raise
    return FitSummary(
        out_dir=out_dir,
        run_id=tracker.run_id if tracker else None,
        tracking_uri=tracker.uri if tracker else None,
        wall_seconds=time.perf_counter() - t0,
        history=result.history,
        model_uri=model_uri,
        sample_quality=quality,
        stopped=result.stopped,
        epochs_done=result.epochs_done,
    )


@dataclass
class EvaluationRun:
    evaluation: Evaluation
    holdout: int
    seed: int
    run_id: str | None


def run_evaluate(
    loaded: LoadedModel,
    source: str,
    holdout: int,
    *,
    seed: int | None = None,
    steps: int | None = None,
    device: str = "auto",
    data_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    track: bool = True,
    split: str = "clean",
) -> EvaluationRun:
    """Score the protocol's test part and log metrics, curves and histograms to MLflow."""
    from .evaluate import curve_figures, evaluate_scores
    from .scoring import Scorer

    cfg = loaded.config
    seed = cfg.train.seed if seed is None else seed
    data = prepare_data(
        source,
        holdout=holdout,
        seed=seed,
        val_fraction=cfg.train.val_fraction,
        image_size=cfg.model.image_size,
        data_dir=data_dir,
        channels=cfg.model.channels,
        data_kind=cfg.model.data_kind,
        split=split,
    )
    scorer = Scorer(loaded, steps=steps, device=resolve_device(device))
    t0 = time.perf_counter()
    table = scorer.score(data.test)
    seconds = time.perf_counter() - t0
    names = scorer.component_names
    ev = evaluate_scores(data.test_is_anomaly, table, names)
    ev.metrics.update(
        {
            "holdout": holdout,
            "seed": seed,
            "score_steps": scorer.score_cfg.steps,
            "score_images_per_second": len(data.test) / seconds,
            "split": split,
            "test_normals_in_training": data.test_in_train,
        }
    )
    run_id = None
    if track:
        with Tracker(tracking_uri, run_name=f"evaluate-{data.name}-holdout{holdout}") as tracker:
            run_id = tracker.run_id
            tracker.set_tags({"job": "evaluate", "model_dir": str(loaded.path), "data": data.name, "split": split})
            if loaded.meta.get("mlflow_run_id"):  # the fit that made the model, to find one from the other
                tracker.set_tags({"fit_run_id": loaded.meta["mlflow_run_id"]})
            tracker.log_params(
                {
                    "model": loaded.path.name,
                    "holdout": holdout,
                    "seed": seed,
                    "split": split,
                    "steps": ev.metrics["score_steps"],
                }
            )
            tracker.log_metrics({k: v for k, v in ev.metrics.items() if isinstance(v, (int, float))})
            tracker.log_metrics({f"auprc.{k}": v for k, v in ev.component_auprc.items()})
            tracker.log_metrics({f"auroc.{k}": v for k, v in ev.component_auroc.items()})
            threshold = scorer.calibration.threshold if scorer.calibration else None
            import matplotlib.pyplot as plt

            for name, fig in curve_figures(
                data.test_is_anomaly, table["score"], threshold, f"holdout {holdout}"
            ).items():
                tracker.log_figure(fig, name)
                plt.close(fig)
    return EvaluationRun(evaluation=ev, holdout=holdout, seed=seed, run_id=run_id)


def training_data_of(
    loaded: LoadedModel, *, data: str | None = None, data_dir: str | Path | None = None
) -> TrainingData:
    """The split a saved model was fitted on, rebuilt from its record (data, hold-out digit, split, seed, validation
    share, training cap, polarity). A file or folder is recorded by its name alone (a model directory carries no
    paths): ``data`` says where it is, and a split whose sizes differ from the record's (another folder of the same
    name) is refused."""
    meta, config = loaded.meta, loaded.config
    source = data or meta.get("data")
    if not source:
        raise DataError("the model does not record its training data: pass --data")
    try:
        td = prepare_data(
            source,
            holdout=meta.get("holdout"),
            seed=config.train.seed,
            val_fraction=config.train.val_fraction,
            max_train=meta.get("max_train", config.train.max_train),
            image_size=config.model.image_size,
            data_dir=data_dir,
            channels=config.model.channels,
            data_kind=config.model.data_kind,
            split=meta.get("split", "clean"),
            polarity=meta.get("polarity", "keep"),
        )
    except DataError as exc:
        if data or is_named_source(source):
            raise
        raise DataError(f"{exc}; the model records its data as {source!r}: pass --data with its path") from None
    recorded = (meta.get("n_train"), meta.get("n_val"))
    if None not in recorded and (len(td.train), len(td.val)) != recorded:
        raise DataError(
            f"{source!r} gives {len(td.train)} training and {len(td.val)} held-in items here, but the model was fitted on "
            f"{recorded[0]} and {recorded[1]}: pass --data with the data it was fitted on"
        )
    return td
