"""The published protocol's MNIST split, replayed, and the clean split beside it."""

import numpy as np
import pytest

from outlier_jebm.data import DataError, holdout_split, load_mnist
from outlier_jebm.pipeline import prepare_data
from outlier_jebm.splits import published_holdout_split


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def loaders_test_part(mnist, label):
    """The published loaders' steps, written out as they are: pool train, test, valid; two draws per call."""
    x, y = mnist.images, mnist.labels
    full_x = np.concatenate([x[:50_000], x[60_000:], x[50_000:60_000]])  # x_train, x_test, x_valid
    full_y = np.concatenate([y[:50_000], y[60_000:], y[50_000:60_000]])
    rng = np.random.RandomState(42)
    parts = []
    for _call in ("train", "test"):
        normal_x, normal_y = full_x[full_y != label], full_y[full_y != label]
        inds = rng.permutation(normal_x.shape[0])
        normal_x, normal_y = normal_x[inds], normal_y[inds]
        index = int(normal_x.shape[0] * 0.8)
        test_x = np.concatenate([normal_x[index:], full_x[full_y == label]])
        test_y = np.concatenate([normal_y[index:], full_y[full_y == label]])
        inds = rng.permutation(test_x.shape[0])
        parts.append((normal_x[:index], test_x[inds], test_y[inds]))
    return parts[0][0], parts[1][1], parts[1][2]  # training part of the first call, test part of the second


def test_the_published_split_replays_the_loaders_bit_for_bit(mnist):
    train_ref, test_ref, test_labels_ref = loaders_test_part(mnist, 4)
    split, leaked = published_holdout_split(mnist, 4, val_fraction=0.05)
    np.testing.assert_array_equal(np.concatenate([split.train, split.val]), train_ref)
    np.testing.assert_array_equal(split.test, test_ref)
    np.testing.assert_array_equal(split.test_labels, test_labels_ref)
    np.testing.assert_array_equal(split.test_is_anomaly, (test_labels_ref == 4).astype(np.int64))
    # the second permutation: about 80 % of the test normals were drawn into training too
    assert 0.75 < leaked < 0.85


def test_the_clean_split_holds_no_training_image_in_its_test_part(mnist):
    clean = holdout_split(mnist, 4, seed=0)
    train = {img.tobytes() for img in np.concatenate([clean.train, clean.val])}
    normals = clean.test[clean.test_is_anomaly == 0]
    shared = np.mean([img.tobytes() in train for img in normals[:2000]])
    assert shared < 0.01  # MNIST's few exact duplicates aside; the published split shares about 80 %


def test_prepare_data_reports_the_overlap_and_refuses_the_published_split_elsewhere(mnist):
    td = prepare_data("mnist", holdout=1, seed=0, val_fraction=0.05, split="published")
    assert td.split == "published" and 0.75 < td.test_in_train < 0.85
    assert td.test_is_anomaly.sum() == (mnist.labels == 1).sum()
    assert prepare_data("mnist", holdout=1, seed=0, val_fraction=0.05).test_in_train == 0.0
    with pytest.raises(DataError, match="published split"):
        prepare_data("digits", holdout=1, seed=0, val_fraction=0.05, split="published")
    with pytest.raises(DataError, match="expected one of clean, published"):
        prepare_data("mnist", holdout=1, seed=0, val_fraction=0.05, split="leaky")
