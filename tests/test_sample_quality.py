"""Sample quality: the Fréchet distance against known answers, the in-project LeNet and its cache."""

import tempfile

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy import linalg
from typer.testing import CliRunner

from outlier_jebm import sample_quality as sq
from outlier_jebm.model import JointEBM


def test_frechet_distance_of_one_dimensional_gaussians_is_the_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    assert sq.frechet_gaussians(
        np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])
    ) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_matches_the_matrix_square_root_formula_for_non_commuting_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    expected = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a + cov_b - 2 * np.real(linalg.sqrtm(cov_a @ cov_b)))
    assert sq.frechet_gaussians(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_zero_on_the_same_set_finite_when_singular_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 5))
    assert sq.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # a dead feature (all zero) makes both covariances singular
    x[:, 0] = 0.0
    assert np.isfinite(sq.frechet_distance(x, x[::-1]))
    assert sq.frechet_distance(x, x + 0.5) == pytest.approx(5 * 0.25, rel=1e-6)  # same covariance: the shift alone
    assert sq.frechet_distance(x, x * 2.0) > sq.frechet_distance(x, x * 1.1) > 0


def test_the_lenet_learns_the_digits_is_cached_by_data_and_tells_real_images_from_noise(
    digits01, tmp_path, monkeypatch
):
    monkeypatch.setenv("JEBM_OD_CACHE", str(tmp_path))
    images, labels = digits01
    clf = sq.train_classifier(images, labels)
    assert clf.accuracy > 0.8  # on the twentieth it did not train on
    stored = list((tmp_path / "lenet").glob("lenet-*.safetensors"))
    assert [p.name for p in stored] == [f"lenet-{clf.key}.safetensors"]
    with monkeypatch.context() as m:  # read from the cache: no training step, the same weights
        m.setattr(sq.nn.functional, "cross_entropy", lambda *a, **k: pytest.fail("trained again"))
        again = sq.train_classifier(images, labels)
    for p, q in zip(clf.net.parameters(), again.net.parameters()):
        assert torch.equal(p, q)
    assert sq.classifier_key(images, labels, seed=1) != clf.key  # another seed, another classifier
    other = labels.copy()
    other[:10] = (other[:10] + 1) % 10
    assert sq.classifier_key(images, other) != clf.key  # other labels, another classifier

    real_a, real_b = images[:800], images[800:1600]
    noise = np.random.default_rng(0).random(real_b.shape).astype(np.float32)
    fa, _ = clf.features_and_confidence(real_a)
    fb, conf_real = clf.features_and_confidence(real_b)
    fn, conf_noise = clf.features_and_confidence(noise)
    assert sq.frechet_distance(fb, fa) < 0.1 * sq.frechet_distance(fn, fa)
    assert conf_real.mean() > conf_noise.mean()
    assert fa.shape == (800, sq.FEATURES)


def test_a_trained_model_gets_a_lower_fid_than_an_untrained_one(digits01):
    from outlier_jebm.train import fit

    images, labels = digits01
    cfg = tiny_config(epochs=15)
    clf = sq.train_classifier(images, labels)
    torch.manual_seed(0)
    untrained = JointEBM(cfg.model)
    trained = JointEBM(cfg.model)
    with tempfile.TemporaryDirectory() as d:
        fit(trained, cfg, images[:1500], images[1500:], d)
    pr = cfg.train.prior_langevin
    q0 = sq.sample_quality(untrained, clf, images, n=500, steps=pr.steps, step_size=pr.step_size)
    q1 = sq.sample_quality(trained, clf, images, n=500, steps=pr.steps, step_size=pr.step_size)
    assert q1["fid_lenet"] < q0["fid_lenet"]
    assert 0 < q1["lenet_confidence"] <= 1 and q1["lenet_accuracy"] == clf.accuracy


def test_sample_metrics_needs_labels_and_says_so(tmp_path, monkeypatch, digits01):
    import yaml

    from jebm_od.cli.main import app

    images, _ = digits01
    np.save(tmp_path / "unlabelled.npy", images[:400])
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=1).to_dict()))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "fit",
            "--data",
            str(tmp_path / "unlabelled.npy"),
            "--config",
            str(cfg),
            "--out",
            "m",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        ["sample", "--model", "m", "--out", "s.png", "--metrics", "--data", str(tmp_path / "unlabelled.npy")],
        env={"COLUMNS": "60"},
    )
    assert res.exit_code == 2
    assert "no class labels" in " ".join(res.output.split())
