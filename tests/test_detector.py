import numpy as np
import pytest
from conftest import tiny_config
from pyod.models.base import BaseDetector
from pyod.utils.data import generate_data
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from outlier_jebm.config import Config, ConfigError, default_config_path
from outlier_jebm.detector import JEBMDetector


def tiny_vector_config(**train) -> Config:
    """A vector model small enough to fit a few hundred rows in a second or two."""
    t = {
        "epochs": 2,
        "min_steps": 150,
        "batch_size": 64,
        "lr_ebm": 1e-3,
        "lr_gen": 3e-3,
        "lr_enc": 3e-3,
        "prior_langevin": {"steps": 10, "step_size": 0.2, "noise": True},
        "val_fraction": 0.1,
    }
    t.update(train)
    return Config.from_dict(
        {
            "model": {
                "data_kind": "vector",
                "z_dims": [4, 2],
                "gen_hidden": [32],
                "cond_hidden": 16,
                "enc_hidden": [32],
                "ebm_hidden": [16, 16],
            },
            "train": t,
            "score": {"batch_size": 256},
        }
    )


@pytest.fixture(scope="module")
def vectors():
    X_train, X_test, y_train, y_test = generate_data(
        n_train=300, n_test=120, n_features=6, contamination=0.1, random_state=42
    )
    return X_train, X_test, y_train, y_test


@pytest.fixture(scope="module")
def fitted(vectors):
    X_train, *_ = vectors
    det = JEBMDetector(contamination=0.1, config=tiny_vector_config(), random_state=0)
    assert det.fit(X_train) is det
    return det


def test_the_detector_is_a_pyod_detector_with_its_fitted_attributes(fitted, vectors):
    X_train, *_ = vectors
    assert isinstance(fitted, BaseDetector)
    for name in ("decision_scores_", "labels_", "threshold_", "_mu", "_sigma", "model_dir_"):
        assert getattr(fitted, name, None) is not None, name
    assert fitted.decision_scores_.shape == (len(X_train),) and fitted.labels_.shape == (len(X_train),)
    assert fitted.data_kind_ == "vector" and fitted.data_shape_ == (6,)
    assert fitted.stopped_early_ == ""  # the breakdown guard did not act
    # the threshold is the (1 - contamination) quantile of the training scores, as in every PyOD detector
    assert fitted.threshold_ == pytest.approx(np.percentile(fitted.decision_scores_, 90))
    assert fitted.labels_.mean() == pytest.approx(0.1, abs=0.01)
    np.testing.assert_array_equal(fitted.labels_, (fitted.decision_scores_ > fitted.threshold_).astype(int))


def test_it_ranks_the_outliers_of_pyods_own_synthetic_data_above_the_inliers(fitted, vectors):
    _, X_test, _, y_test = vectors
    scores = fitted.decision_function(X_test)
    assert scores.shape == (len(X_test),) and np.isfinite(scores).all()
    assert roc_auc_score(y_test, scores) > 0.9


def test_a_stop_by_the_breakdown_guard_is_a_convergence_warning_and_an_attribute(vectors, monkeypatch):
    from sklearn.exceptions import ConvergenceWarning

    from outlier_jebm.train import BestEpoch

    real = BestEpoch.check
    message = "held-in -ELBO rose (a test); stopped, keeping epoch 1's weights"
    monkeypatch.setattr(BestEpoch, "check", lambda self, epoch, *a: message if epoch == 1 else real(self, epoch, *a))
    det = JEBMDetector(contamination=0.1, config=tiny_vector_config(max_recon_rise=0.5), random_state=0)
    with pytest.warns(ConvergenceWarning, match="keeping epoch 1's weights"):
        det.fit(vectors[0])
    assert det.stopped_early_ == message
    assert det.decision_function(vectors[1]).shape == (len(vectors[1]),)


def test_predict_proba_and_confidence_follow_pyods_methods(fitted, vectors):
    _, X_test, _, _ = vectors
    labels = fitted.predict(X_test)
    np.testing.assert_array_equal(labels, (fitted.decision_function(X_test) > fitted.threshold_).astype(int))
    linear = fitted.predict_proba(X_test, method="linear")
    unify = fitted.predict_proba(X_test, method="unify")
    for proba in (linear, unify):
        assert proba.shape == (len(X_test), 2)
        np.testing.assert_allclose(proba.sum(1), 1.0)
        assert ((proba >= 0) & (proba <= 1)).all()
    assert not np.allclose(linear, unify)  # the method is honoured, not ignored
    with pytest.raises(ValueError):
        fitted.predict_proba(X_test, method="something")
    confidence = fitted.predict_confidence(X_test)
    assert confidence.shape == (len(X_test),) and ((confidence >= 0) & (confidence <= 1)).all()
    labels, confidence = fitted.predict(X_test, return_confidence=True)
    assert labels.shape == confidence.shape == (len(X_test),)


def test_params_are_sklearn_style_and_unknown_names_are_refused(fitted):
    params = fitted.get_params()
    assert {"contamination", "config", "preprocessing", "epochs", "random_state", "device"} <= set(params)
    twin = clone(fitted)
    assert twin.get_params()["contamination"] == 0.1 and not hasattr(twin, "decision_scores_")
    twin.set_params(epochs=3, preprocessing="none")
    assert twin.epochs == 3 and twin.preprocessing == "none"
    with pytest.raises(ValueError, match="Invalid parameter"):
        twin.set_params(epoch=3)


def test_a_mismatched_shape_at_scoring_time_names_the_problem(fitted):
    with pytest.raises(ValueError, match="5 features, but the model was fitted on 6"):
        fitted.decision_function(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="fitted on vectors of 6 features"):
        fitted.decision_function(np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fitted.decision_function(np.full((2, 6), np.nan))


def test_an_unfitted_detector_says_so():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        JEBMDetector().decision_function(np.zeros((1, 6)))


@pytest.mark.parametrize("d", [2, 30, 784])
def test_vectors_of_any_width_train_and_score(d):
    rng = np.random.default_rng(d)
    X = rng.normal(size=(200, d)).astype(np.float32) * rng.uniform(0.1, 100, size=d)  # features of unlike scales
    det = JEBMDetector(config=tiny_vector_config(min_steps=40), random_state=0).fit(X)
    far = X[:5] + 20 * X.std(0)
    scores = det.decision_function(np.concatenate([X[:20], far]))
    assert np.isfinite(scores).all()
    assert scores[20:].min() > np.median(scores[:20])


def test_a_dataframe_is_scored_by_its_column_names_as_scikit_learn_records_them(fitted, vectors):
    import pandas as pd

    X_train, X_test, *_ = vectors
    assert fitted.n_features_in_ == 6 and not hasattr(fitted, "feature_names_in_")  # an array has no names
    names = [f"f{i}" for i in range(6)]
    det = JEBMDetector(contamination=0.1, config=tiny_vector_config(), random_state=0)
    det.fit(pd.DataFrame(X_train, columns=names))
    assert list(det.feature_names_in_) == names and det.n_features_in_ == 6
    frame = pd.DataFrame(X_test, columns=names)
    want = det.decision_function(X_test)
    np.testing.assert_array_equal(det.decision_function(frame[names[::-1]]), want)  # any order: matched by name
    with pytest.raises(ValueError, match="X: column.s. f5 missing"):
        det.decision_function(frame.drop(columns="f5").assign(other=0.0))
    # refitted on an array, it forgets the names
    det.set_params(epochs=1).fit(X_train)
    assert not hasattr(det, "feature_names_in_") and det.n_features_in_ == 6


def test_nullable_and_boolean_dataframe_columns_are_numbers_and_a_text_column_is_named(fitted, vectors):
    import pandas as pd

    X_train, X_test, *_ = vectors
    frame = pd.DataFrame(X_test, columns=[f"f{i}" for i in range(6)])
    nullable = frame.astype("Float64")
    np.testing.assert_allclose(fitted.decision_function(nullable), fitted.decision_function(X_test), rtol=1e-6)
    nullable.iloc[0, 0] = pd.NA  # a missing value is NaN: refused by row and feature, as in an array
    with pytest.raises(ValueError, match="row 0, feature 0"):
        fitted.decision_function(nullable)
    with pytest.raises(ValueError, match="X: column.s. f2 are not numeric"):
        fitted.decision_function(frame.astype({"f2": "category"}))


def test_a_pythresh_style_thresholder_sets_the_labels(vectors):
    X_train, *_ = vectors

    class TopTen:  # PyThresh's contract: fit(scores) sets labels_ and thresh_
        def fit(self, scores):
            self.thresh_ = float(np.sort(scores)[-10])
            self.labels_ = (scores >= self.thresh_).astype(int)

    det = JEBMDetector(contamination=TopTen(), config=tiny_vector_config(epochs=1), random_state=0).fit(X_train)
    assert det.labels_.sum() == 10 and det.threshold_ == np.sort(det.decision_scores_)[-10]
    with pytest.raises(ValueError, match="PyThresh thresholder"):
        JEBMDetector(contamination="ten percent").fit(X_train)


def test_standardisation_is_fitted_on_the_training_data_and_saved_with_the_model(fitted, vectors):
    from outlier_jebm.checkpoint import load_model

    model = load_model(fitted.model_dir_).model
    assert model.cfg.standardize
    # the training part is X minus the held-in share: its statistics are those of most of X
    X_train, *_ = vectors
    np.testing.assert_allclose(model.x_shift.numpy(), X_train.mean(0), atol=0.2)
    raw = JEBMDetector(config=tiny_vector_config(min_steps=20), preprocessing="none", random_state=0).fit(X_train)
    raw_model = load_model(raw.model_dir_).model
    assert not raw_model.cfg.standardize
    np.testing.assert_array_equal(raw_model.x_shift.numpy(), 0.0)
    np.testing.assert_array_equal(raw_model.x_scale.numpy(), 1.0)


def test_the_detector_is_a_member_of_a_pyod_ensemble(vectors):
    from pyod.models.knn import KNN
    from pyod.models.lscp import LSCP

    X_train, X_test, _, y_test = vectors
    ensemble = LSCP([JEBMDetector(config=tiny_vector_config(min_steps=60), random_state=0), KNN()], random_state=0)
    ensemble.fit(X_train)
    scores = ensemble.decision_function(X_test)
    assert scores.shape == (len(X_test),) and roc_auc_score(y_test, scores) > 0.8


def test_images_fit_with_the_configs_backbone(digits01):
    images, labels = digits01
    X = images[labels != 0]
    det = JEBMDetector(contamination=0.1, config=tiny_config(epochs=3), random_state=0).fit(X)
    assert det.data_kind_ == "image" and det.data_shape_ == (8, 8)
    ints = np.round(images[labels == 0][:5] * 255).astype(np.uint8)
    np.testing.assert_allclose(det.decision_function(ints), det.decision_function(ints / 255.0), atol=1e-4)
    assert det.decision_function(images[labels == 0]).mean() > det.decision_function(X).mean()
    with pytest.raises(ValueError, match="looks like vectors"):
        det.decision_function(X.reshape(len(X), -1))
    # gray images with a channel axis of 1, as Keras keeps them, are the same images
    np.testing.assert_array_equal(det.decision_function(ints[..., None]), det.decision_function(ints))
    assert det._config_for(ints[..., None]).model.channels == 1
    with pytest.raises(ValueError, match="X: images with 4 channels"):
        det._config_for(np.zeros((4, 8, 8, 4), dtype=np.float32))


def test_without_a_config_images_get_the_conv_default_where_it_fits_and_the_mlp_elsewhere():
    det = JEBMDetector(epochs=1, random_state=0)
    mnist_sized, colour, small = (
        det._config_for(np.zeros(shape, dtype=np.float32)) for shape in ((4, 28, 28), (4, 32, 32, 3), (4, 8, 8))
    )
    assert (mnist_sized.model.backbone, mnist_sized.model.image_size) == ("conv", 28)
    assert (colour.model.backbone, colour.model.image_size, colour.model.channels) == ("conv", 32, 3)
    assert (small.model.backbone, small.model.image_size) == ("mlp", 8)
    conv_given = Config.from_yaml(default_config_path())
    with pytest.raises(ConfigError, match="image_size 8 is not supported by the conv backbone"):
        JEBMDetector(config=conv_given)._config_for(np.zeros((4, 8, 8), dtype=np.float32))
