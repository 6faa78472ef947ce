import numpy as np
import pytest

from outlier_jebm.detector import JEBMDetector

from conftest import tiny_config


@pytest.fixture(scope="module")
def fitted_detector():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.images[d.target != 0].reshape(-1, 64) / 16.0
    det = JEBMDetector(tiny_config(epochs=5), contamination=0.1, image_size=8)
    assert det.fit(X) is det
    return det, X, d.images[d.target == 0].reshape(-1, 64) / 16.0


def test_detector_follows_the_pyod_contract(fitted_detector):
    det, X, outliers = fitted_detector
    n = len(X)
    assert det.decision_scores_.shape == (n,) and det.labels_.shape == (n,)
    assert set(np.unique(det.labels_)) <= {0, 1}
    np.testing.assert_array_equal(det.labels_, (det.decision_scores_ > det.threshold_).astype(int))
    # the threshold is the (1 - contamination) quantile of held-in scores: about 10 % of inliers flagged
    assert 0.03 < det.labels_.mean() < 0.2
    proba = det.predict_proba(X[:20])
    assert proba.shape == (20, 2) and np.allclose(proba.sum(1), 1) and ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(det.predict(X[:20]), det.decision_function(X[:20]) > det.threshold_)
    assert det.decision_function(outliers).mean() > det.decision_function(X).mean()


def test_detector_accepts_integer_images_and_rejects_bad_shapes(fitted_detector):
    det, _, outliers = fitted_detector
    ints = np.round(outliers[:5] * 255).astype(np.uint8)
    np.testing.assert_allclose(det.decision_function(ints), det.decision_function(outliers[:5]), atol=0.05)
    with pytest.raises(ValueError, match="X"):
        det.decision_function(np.zeros((3, 50)))


def test_an_unfitted_detector_says_so():
    with pytest.raises(RuntimeError, match="fit"):
        JEBMDetector().decision_function(np.zeros((1, 784)))
