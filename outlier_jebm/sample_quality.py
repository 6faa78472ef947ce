"""Sample quality without downloads: a Fréchet distance in the features of a classifier trained here.

Inception FID needs weights from the internet and ImageNet-sized color inputs; neither fits an
offline 28 x 28 product. Instead a LeNet-sized CNN is trained on the split's own training part
(images and their class labels, never the held-out class), and prior samples are compared with
training images in its penultimate-layer features (84 numbers per image):

- ``fid_lenet``: the Fréchet distance between Gaussians fitted to the two feature sets,
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). Call it "FID (in-project LeNet
  features)": it is comparable between models scored with the same classifier, and not with
  Inception FID or with another classifier.
- ``lenet_confidence``: the classifier's mean top-class probability on the samples; legible
  digits get confident answers, smudges do not.

The classifier is cached under the cache folder (``$JEBM_OD_CACHE``, as the native kernel) by a
hash of its training images, labels, this file and the torch version, so a benchmark trains it
once per split.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import DataError
from .fileio import atomic_path, write_text_atomic
from .langevin import prior_langevin
from .model import JointEBM
from .native import cache_dir
from .sampling import to_images

if TYPE_CHECKING:
    from .checkpoint import LoadedModel
    from .config import Config
    from .pipeline import TrainingData

FEATURES = 84
EPOCHS = 3
BATCH = 128
LR = 1e-3
MAX_TRAIN = 30_000  # images the classifier trains on (drawn with its seed when the part is larger)
N_SAMPLES = 10_000  # prior samples and training images compared by default


class LeNet(nn.Module):
    """LeNet-5 sized: two 5x5 convs with pooling, then 120 -> 84 -> classes. Any square size, 1 or 3 channels."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(5),
            nn.Flatten(),
            nn.Linear(16 * 25, 120),
            nn.ReLU(),
            nn.Linear(120, FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


MIN_SIDE = 28  # smaller images (sklearn's 8 x 8 digits) are enlarged to this side first


def _as_batch(images01: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) in [0, 1] -> (N, C, H', W') in [-1, 1], H' = max(H, 28)."""
    x = torch.from_numpy(np.ascontiguousarray(images01, dtype=np.float32))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-1] < MIN_SIDE:
        x = nn.functional.interpolate(x, size=(MIN_SIDE, MIN_SIDE), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0


@dataclass
class Classifier:
    """The trained LeNet, the classes it knows and its accuracy on images it did not train on."""

    net: LeNet
    classes: np.ndarray  # label of each output
    accuracy: float
    key: str

    @torch.no_grad()
    def features_and_confidence(self, images01: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (N, 84) and top-class probability (N,)."""
        self.net.eval()
        feats, conf = [], []
        for i in range(0, len(images01), batch):
            f = self.net.features(_as_batch(images01[i : i + batch]))
            feats.append(f.double().numpy())
            conf.append(torch.softmax(self.net.head(f), dim=1).amax(1).double().numpy())
        return np.concatenate(feats), np.concatenate(conf)


def classifier_key(images01: np.ndarray, labels: np.ndarray, seed: int = 0) -> str:
    """Hash of what the classifier is a function of: its data, its seed, this code, the torch version."""
    h = hashlib.sha256()
    h.update(f"seed={seed};".encode())
    h.update(np.ascontiguousarray(images01, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(Path(__file__).read_bytes())
    h.update(torch.__version__.encode())
    h.update(repr(images01.shape).encode())
    return h.hexdigest()[:24]


def train_classifier(images01: np.ndarray, labels: np.ndarray, *, seed: int = 0, cache: bool = True) -> Classifier:
    """Train (or load from the cache) a LeNet on labelled images (N, H, W[, C]) in [0, 1].

    A twentieth of the images (at least one) is kept out of training to measure its accuracy.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images01) != len(labels):
        raise ValueError(f"{len(images01)} images but {len(labels)} labels")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("the classifier needs images of at least two classes")
    key = classifier_key(images01, labels, seed)
    path = cache_dir() / "lenet" / f"lenet-{key}.safetensors"
    channels = 1 if images01.ndim == 3 else images01.shape[-1]
    if cache and path.is_file():
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            net = LeNet(channels, len(classes))
            net.load_state_dict(load_file(str(path)))
            return Classifier(net.eval(), np.asarray(meta["classes"]), float(meta["accuracy"]), key)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError):
            pass  # an unreadable cache entry is trained again and replaced

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images01))
    n_check = max(1, len(order) // 20)
    check, fit_idx = order[:n_check], order[n_check:][:MAX_TRAIN]
    target = torch.from_numpy(np.searchsorted(classes, labels))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = LeNet(channels, len(classes))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x_all = _as_batch(images01)
    for _ in range(EPOCHS):
        perm = torch.from_numpy(fit_idx)[torch.randperm(len(fit_idx), generator=gen)]
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            loss = nn.functional.cross_entropy(net(x_all[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_all[check]).argmax(1) == target[check]).float().mean())
    out = Classifier(net, classes, accuracy, key)
    if cache:
        _store(
            path,
            net,
            {
                "classes": classes.tolist(),
                "accuracy": accuracy,
                "n_train": int(len(fit_idx)),
                "epochs": EPOCHS,
                "torch": torch.__version__,
            },
        )
    return out


def _store(path: Path, net: nn.Module, meta: dict) -> None:
    """Metadata then weights, each atomically: the weights' presence means both are whole."""
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta))
    with atomic_path(path) as tmp:
        save_file(net.state_dict(), str(tmp))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a (N, F) and b (M, F)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return frechet_gaussians(mu_a, cov_a, mu_b, cov_b)


def frechet_gaussians(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for two Gaussians.

    Tr (S_a S_b)^(1/2) is computed as the sum of the square roots of the eigenvalues of the
    symmetric S_a^(1/2) S_b S_a^(1/2) (similar to S_a S_b), which stays real and finite when a
    covariance is singular (dead ReLU features); round-off below zero is clipped.
    """
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum())
    diff = np.atleast_1d(mu_a - mu_b)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


@torch.no_grad()
def prior_images(
    model: JointEBM, n: int, *, steps: int, step_size: float, seed: int = 0, batch: int = 1000
) -> np.ndarray:
    """n images decoded from prior Langevin samples, in batches, with a fixed seed."""
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, n, batch):
            with torch.enable_grad():
                z, _ = prior_langevin(model, min(batch, n - i), steps=steps, step_size=step_size)
            out.append(to_images(model, z))
    model.train(was_training)
    return np.concatenate(out)


def sample_quality(
    model: JointEBM,
    classifier: Classifier,
    train01: np.ndarray,
    *,
    n: int = N_SAMPLES,
    steps: int,
    step_size: float,
    seed: int = 0,
) -> dict[str, float]:
    """FID (in-project LeNet features) of n prior samples against up to n training images, and confidences.

    Not comparable with Inception FID: the features are those of a small classifier trained on
    the split's own training part.

    Parameters
    ----------
    model : JointEBM
        The generator and prior to sample from.
    classifier : Classifier
        From ``train_classifier``, trained on the same training part.
    train01 : np.ndarray
        Training images in [0, 1], (N, H, W).
    n : int, default N_SAMPLES
        Number of samples (and of training images, at most).
    steps, step_size : int, float
        Prior Langevin settings of the sampler (``train.sampler_steps`` and ``train.prior_langevin``).
    seed : int, default 0
        Seed of the sampler and of the pick of training images.

    Returns
    -------
    dict
        ``fid_lenet``, ``lenet_confidence`` (mean top-class confidence on the samples),
        ``lenet_confidence_training`` and ``lenet_accuracy`` (of the classifier, on training
        images it did not fit), so that a figure can be read against what real images give.
    """
    pick = np.random.default_rng(seed).permutation(len(train01))[:n]
    real_f, real_c = classifier.features_and_confidence(train01[pick])
    samples = prior_images(model, n, steps=steps, step_size=step_size, seed=seed)
    fake_f, fake_c = classifier.features_and_confidence(samples)
    return {
        "fid_lenet": frechet_distance(fake_f, real_f),
        "lenet_confidence": float(fake_c.mean()),
        "lenet_confidence_training": float(real_c.mean()),
        "lenet_accuracy": classifier.accuracy,
    }


def _has_classes(labels: np.ndarray | None) -> bool:
    """Whether the training images have the class labels (two or more) that the classifier trains on."""
    return labels is not None and len(np.unique(labels)) >= 2


def fit_sample_quality(
    model: JointEBM,
    config: Config,
    data: TrainingData,
    n: int | None = None,
    *,
    steps: int | None = None,
    seed: int | None = None,
) -> dict[str, float] | None:
    """Sample quality of a fitted image model (``sample_quality``), or None where it does not apply.

    Needs class labels for the training images (MNIST, sklearn digits, labelled arrays) and an
    image model; ``n`` (default ``train.sample_metrics``, 0 = off) prior samples (``steps``
    prior Langevin steps, default ``train.sampler_steps``) are compared with as many training images
    in the features of a LeNet trained on the training part (with ``seed``, default
    ``train.seed``). Also returns ``samples`` (n), ``steps`` (the chain's length; 0 for a
    model without an EBM, whose prior is sampled exactly) and ``seconds`` (the wall time of all this).
    """
    n = config.train.sample_metrics if n is None else n
    labels = data.train_labels
    if n <= 0 or config.model.is_vector or not _has_classes(labels):
        return None
    t0 = time.perf_counter()
    seed = config.train.seed if seed is None else seed
    steps = config.train.sampler_steps if steps is None else steps
    classifier = train_classifier(data.train, labels, seed=seed)
    pr = config.train.prior_langevin
    out = sample_quality(model, classifier, data.train, n=n, steps=steps, step_size=pr.step_size, seed=seed)
    ran = steps if model.has_ebm else 0  # the Gaussian hierarchy alone is sampled exactly, without a chain
    return {**out, "samples": float(n), "steps": float(ran), "seconds": time.perf_counter() - t0}


def model_sample_quality(
    loaded: LoadedModel,
    *,
    n: int | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """``fit_sample_quality`` for a saved model, on the training part it was fitted on.

    The part is rebuilt from the model's record (data, hold-out digit, split, seed, cap);
    ``data`` names the source where the record's is not loadable from here. Raises
    ``DataError`` when the data has no class labels (folders, bare arrays) or the model
    scores vectors.
    """
    from .pipeline import training_data_of

    config = loaded.config
    source = data or loaded.meta.get("data")
    if config.model.is_vector:
        raise DataError("sample quality is measured for image models; this model scores vectors")
    td = training_data_of(loaded, data=data, data_dir=data_dir)
    if not _has_classes(td.train_labels):
        raise DataError(
            f"{source}: no class labels, which the sample-quality classifier trains on "
            "(MNIST, sklearn digits or a .npz with labels)"
        )
    n = config.train.sample_metrics if n is None else n
    if n <= 0:
        raise DataError(f"the number of samples must be positive, got {n}")
    result = fit_sample_quality(loaded.model, config, td, n=n, steps=steps, seed=seed)
    assert result is not None  # the conditions above are fit_sample_quality's
    return result
