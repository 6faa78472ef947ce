"""The published protocol's MNIST split, reproduced, and how much of its test part is training data.

The papers' baselines come from MEG's ``data/mnist_anomaly.py`` (and EGBAD's ``data/mnist.py``).
Those loaders hold one module-level ``np.random.RandomState(42)`` and pool a 50 000 / 10 000 /
10 000 copy of MNIST in the order train, test, valid. Each call of their ``_get_adapted_dataset``
draws twice from it: a permutation of the normal images (the first 80 % are the training part,
the last 20 % plus every held-out image the test part), then a shuffle of that test part. A run
asks for the training part first and the test part second, so the training images come from
the first permutation and the test normals from a *second* one: about 80 % of the test normals
are training images (benchmarks/RESULTS.md, "The published split, replayed").

``published_holdout_split`` replays those four draws on ``load_mnist``'s pool (the original
60 000 training images in order, the first 50 000 being the loaders' train part and the last
10 000 their valid part, then the 10 000 test images). The clean split of ``data.holdout_split``
is the default everywhere; this one exists to compare with the papers on their own terms and to
measure what the leak is worth.
"""

from __future__ import annotations

import numpy as np

from .data import DataError, Dataset, Split, split_by_index

SPLITS = ("clean", "published")
PUBLISHED_SEED = 42
TRAIN_SHARE = 0.8
# load_mnist's pool (train 50k, valid 10k, test 10k) in the loaders' order (train, test, valid)
LOADER_ORDER = np.r_[0:50_000, 60_000:70_000, 50_000:60_000]


def published_holdout_split(ds: Dataset, holdout: int, val_fraction: float = 0.05) -> tuple[Split, float]:
    """The published loaders' split of pooled MNIST for ``holdout``, and the share of its test
    normals that are also in its training part.

    ``val`` is carved from the end of the training part, as ``data.holdout_split`` does; ``test``
    keeps the loaders' own shuffled order. There is no seed: the loaders always use 42.
    """
    if ds.labels is None or len(ds.labels) != len(LOADER_ORDER):
        raise DataError(
            f"the published split is defined on pooled MNIST (70 000 labelled images); {ds.name!r} has {len(ds)}"
        )
    labels = np.asarray(ds.labels)[LOADER_ORDER]
    normal = LOADER_ORDER[labels != holdout]  # indices into ds, in the loaders' order
    anomalous = LOADER_ORDER[labels == holdout]
    n_train = int(len(normal) * TRAIN_SHARE)
    rng = np.random.RandomState(PUBLISHED_SEED)
    train_part = normal[rng.permutation(len(normal))][:n_train]  # get_train: draw 1
    rng.permutation(len(normal) - n_train + len(anomalous))  # get_train's test shuffle: draw 2, unused
    test_normal = normal[rng.permutation(len(normal))][n_train:]  # get_test: draw 3
    test_idx = np.concatenate([test_normal, anomalous])
    test_idx = test_idx[rng.permutation(len(test_idx))]  # get_test's shuffle: draw 4
    n_val = int(round(val_fraction * n_train))
    train_idx, val_idx = train_part[: n_train - n_val], train_part[n_train - n_val :]
    leaked = float(np.isin(test_normal, train_part).mean())
    split = split_by_index(ds, holdout, PUBLISHED_SEED, train_idx, val_idx, test_idx)
    return split, leaked
