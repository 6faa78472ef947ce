import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from outlier_jebm.batch import ResultWriter, score_files
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import holdout_split, load_digits
from outlier_jebm.evaluate import detection_metrics
from outlier_jebm.model import JointEBM
from outlier_jebm.scoring import DEFAULT_COMBINATION, Scorer, calibrate, component_names, fit_calibration
from outlier_jebm.train import fit


def _train_digits(tmp_path, holdout, seed, epochs=25, **train):
    ds = load_digits()
    split = holdout_split(ds, holdout, seed=seed, val_fraction=0.15)
    cfg = tiny_config("chain", "joint", epochs=epochs, seed=seed, **train)
    torch.manual_seed(seed)
    out = tmp_path / f"h{holdout}s{seed}"
    fit(JointEBM(cfg.model), cfg, split.train, split.val, out)
    loaded = load_model(out)
    calibrate(loaded, split.train, split.val, seed=seed)
    return loaded, split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_digits(tmp_path_factory.mktemp("model"), holdout=0, seed=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_held_out_digit_scores_higher_than_held_in_digits(tmp_path, seed):
    loaded, split = _train_digits(tmp_path, holdout=0, seed=seed)
    table = Scorer(loaded).score(split.test)
    m = detection_metrics(split.test_is_anomaly, table["score"])
    # chance AUROC is 0.5 and chance AUPRC the anomaly rate (about 0.34 here)
    assert m["auroc"] > 0.8, m
    assert m["auprc"] > split.test_is_anomaly.mean() + 0.2, m


def test_with_noise_off_a_batch_scores_like_its_items_one_by_one(trained):
    loaded, split = trained
    scorer = Scorer(loaded, steps=5)
    assert scorer.score_cfg.noise is False
    images = split.test[:12]
    batch = scorer.score(images)
    for i in range(len(images)):
        single = scorer.score(images[i : i + 1])
        for key in ["score", "neg_log_joint", "recon", "latent_knn", "energy_drop"]:
            np.testing.assert_allclose(single[key][0], batch[key][i], rtol=1e-4, atol=1e-4)


def test_langevin_steps_raise_log_joint_above_the_encoders_guess(trained):
    loaded, split = trained
    table = Scorer(loaded, steps=10).components_of(split.test[:64]).components
    assert table["energy_drop"].mean() > 0


def test_the_stored_calibration_is_refitted_from_held_in_validation_components_alone(trained):
    loaded, split = trained
    comps = Scorer(loaded).components_of(split.val).components
    cal = fit_calibration(comps, combine=DEFAULT_COMBINATION, false_alarm_rate=0.05, score_steps=0)
    # the stored file adds the score.shifts its scales were fitted with
    assert {**cal.to_dict(), "extra": {"score_shifts": 0}} == loaded.calibration
    s = cal.score(comps)
    assert np.mean(s > cal.threshold) == pytest.approx(0.05, abs=0.02)
    assert np.mean(cal.normalize(s) > 0.5) == pytest.approx(np.mean(s > cal.threshold))
    assert cal.normalize(np.array([cal.threshold]))[0] == pytest.approx(0.5)


def test_a_weighted_combination_is_the_weighted_mean_of_robust_z_scores_and_old_files_weigh_one():
    rng = np.random.default_rng(0)
    comps = {"a": rng.normal(3, 2, 400), "b": rng.exponential(1, 400), "c": rng.normal(0, 1, 400)}
    cal = fit_calibration(comps, combine=["a", "b", "c"], weights={"c": 0.25}, false_alarm_rate=0.1, score_steps=0)
    z = cal.robust_z(comps)
    assert z["a"] == pytest.approx((comps["a"] - np.median(comps["a"])) / cal.scale["a"])
    assert cal.score(comps) == pytest.approx((z["a"] + z["b"] + 0.25 * z["c"]) / 2.25)
    assert np.mean(cal.score(comps) > cal.threshold) == pytest.approx(0.1, abs=0.01)
    # a calibration.json written before weights existed reads back with every weight 1
    old = cal.to_dict()
    del old["weights"]
    assert type(cal).from_dict(old).score(comps) == pytest.approx((z["a"] + z["b"] + z["c"]) / 3)
    with pytest.raises(ValueError, match="not combined"):
        fit_calibration(comps, combine=["a"], weights={"c": 1.0}, false_alarm_rate=0.1, score_steps=0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        fit_calibration(comps, combine=["a", "c"], weights={"c": -1.0}, false_alarm_rate=0.1, score_steps=0)
    with pytest.raises(ValueError, match="all 0"):
        fit_calibration(comps, combine=["a"], weights={"a": 0.0}, false_alarm_rate=0.1, score_steps=0)


def test_a_margin_adds_only_the_excess_of_a_robust_z_score_over_tau_and_old_files_have_none():
    rng = np.random.default_rng(1)
    comps = {"a": rng.normal(3, 2, 400), "b": rng.exponential(1, 400), "w": rng.normal(0, 1, 400)}
    cal = fit_calibration(comps, combine=["a", "b"], margins={"w": 2.0}, false_alarm_rate=0.1, score_steps=0)
    z = cal.robust_z(comps)
    excess = np.maximum(z["w"] - 2.0, 0.0)
    assert 0 < np.count_nonzero(excess) < 40  # a few inputs past the margin, most not
    assert cal.score(comps) == pytest.approx((z["a"] + z["b"]) / 2 + excess)
    assert np.mean(cal.score(comps) > cal.threshold) == pytest.approx(0.1, abs=0.01)
    # below the margin the component changes nothing, however low it is
    low = {**comps, "w": comps["w"] - 100.0}
    assert cal.score(low) == pytest.approx((z["a"] + z["b"]) / 2)
    # a calibration.json written before margins existed reads back without them
    old = cal.to_dict()
    del old["margins"]
    assert type(cal).from_dict(old).score(comps) == pytest.approx((z["a"] + z["b"]) / 2)
    # a margin on a component that was not computed is left out, as combine's are
    assert fit_calibration(comps, combine=["a"], margins={"zz": 1.0}, false_alarm_rate=0.1, score_steps=0).margins == {}
    with pytest.raises(ValueError, match="margins must be finite"):
        fit_calibration(comps, combine=["a"], margins={"w": float("nan")}, false_alarm_rate=0.1, score_steps=0)


def test_posterior_width_is_the_log_width_of_q_and_width_margin_puts_it_in_the_stored_score(trained, tmp_path):
    import copy
    import shutil

    from outlier_jebm.model import to_model_space

    loaded, split = trained
    images = split.test[:50]
    comps = Scorer(loaded).components_of(images).components
    with torch.no_grad():
        _, sigma = loaded.model.encoder.posterior(to_model_space(images))
    np.testing.assert_allclose(comps["posterior_width"], sigma.log().sum(-1).double().numpy(), rtol=1e-5)
    assert loaded.calibration["margins"] == {}  # the tiny config leaves the term off

    shutil.copytree(loaded.path, tmp_path / "m")
    wide = copy.copy(load_model(tmp_path / "m"))
    wide.config = wide.config.with_overrides(score={"width_margin": 1.0})
    cal = calibrate(wide, split.train, split.val, seed=0)
    assert cal.margins == {"posterior_width": 1.0}
    assert load_model(tmp_path / "m").calibration["margins"] == {"posterior_width": 1.0}
    scored = Scorer(wide).score(images)
    z = cal.robust_z(comps)
    want = (z["latent_knn_cos"] + z["latent_knn"]) / 2 + np.maximum(z["posterior_width"] - 1.0, 0.0)
    np.testing.assert_allclose(scored["score"], want, rtol=1e-4, atol=1e-4)


class _Tripwire:
    """Stands in for the test part and its labels: any use of it fails the test."""

    def _touched(self, *args, **kwargs):
        raise AssertionError("the fit read the test part or its anomaly labels")

    __getattr__ = __getitem__ = __len__ = __iter__ = __array__ = __bool__ = _touched


def test_fit_and_calibration_never_read_the_test_part_or_its_anomaly_labels(tmp_path):
    from outlier_jebm.pipeline import TrainingData, run_fit

    split = holdout_split(load_digits(), 0, seed=0, val_fraction=0.15)
    cfg = tiny_config(epochs=1)  # with the fit-end sample quality, which reads the training labels
    common = dict(train=split.train, val=split.val, name="digits", holdout=0, train_labels=split.train_labels)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # tracked, so that the MLflow branch runs too
    first = run_fit(cfg, TrainingData(**common), out_dir=tmp_path / "a", tracking_uri=uri, remember=False)
    assert first.sample_quality is not None
    # the run records the last epoch's prior chain, one point per Langevin step (tiny_config: 10 steps)
    from mlflow.tracking import MlflowClient

    chain = MlflowClient(uri).get_metric_history(first.run_id, "prior_chain_log_density")
    assert sorted(m.step for m in chain) == list(range(11)) and all(np.isfinite(m.value) for m in chain)
    # the same fit with the test part and its labels replaced by tripwires: it must not touch them,
    # and it must calibrate to the same threshold (the calibration is a function of held-in images only)
    wired = TrainingData(**common, test=_Tripwire(), test_is_anomaly=_Tripwire())
    run_fit(cfg, wired, out_dir=tmp_path / "b", tracking_uri=uri, remember=False)
    a, b = load_model(tmp_path / "a").calibration, load_model(tmp_path / "b").calibration
    assert a["threshold"] == pytest.approx(b["threshold"], rel=1e-5)


def test_a_models_training_data_is_rebuilt_from_its_record_or_refused_with_the_reason(trained, tmp_path, monkeypatch):
    from dataclasses import replace

    from outlier_jebm.data import DataError
    from outlier_jebm.pipeline import training_data_of

    loaded, _ = trained
    meta = {"data": "digits", "holdout": 0}
    td = training_data_of(replace(loaded, meta=meta))
    sizes = {"n_train": len(td.train), "n_val": len(td.val)}
    assert training_data_of(replace(loaded, meta=meta | sizes)).train.shape == td.train.shape
    # another data set under the recorded name (here: a different training cap) is refused, not used
    with pytest.raises(DataError, match=r"'digits' gives .* but the model was fitted on .*: pass --data"):
        training_data_of(replace(loaded, meta=meta | sizes | {"max_train": 100}))
    # a folder recorded by its name, not found from here: the reason and what to do
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"photos does not exist.*records its data as 'photos': pass --data"):
        training_data_of(replace(loaded, meta={"data": "photos", "holdout": None}))


def test_every_input_gets_a_top_component_among_the_components(trained):
    loaded, split = trained
    scorer = Scorer(loaded)
    table = scorer.score(split.test[:20])
    names = component_names(scorer.model, True)
    assert set(table["top_component"]) <= set(names)
    assert set(names) <= set(table)


def _png(path, array01, mode="L"):
    img = Image.fromarray((np.clip(array01, 0, 1) * 255).astype(np.uint8), mode="L")
    if mode != "L":
        img = img.convert(mode)
    img.save(path)


def test_a_folder_with_bad_files_scores_the_good_ones_and_reports_the_bad_ones(trained, tmp_path):
    loaded, split = trained
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        _png(folder / f"good{i}.png", split.test[i])
    _png(folder / "sub" / "rgb.png", split.test[5], mode="RGB")
    Image.fromarray((split.test[6] * 65535).astype(np.uint16)).save(folder / "deep16.png")
    big = np.kron(split.test[7], np.ones((200, 200)))  # 1600 x 1600
    _png(folder / "large.png", big)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    rows = list(score_files(Scorer(loaded), [folder]))
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert len(rows) == 12
    for name in ["good0.png", "good4.png", "rgb.png", "deep16.png", "large.png"]:
        assert by_name[name]["error"] == "" and np.isfinite(by_name[name]["score"]), name
    for name in ["empty.png", "notes.png", "truncated.png", "noise.jpg"]:
        assert by_name[name]["error"] and by_name[name]["score"] is None, name


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_results_are_written_one_row_per_input(trained, tmp_path, suffix):
    loaded, split = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", split.test[i])
    (folder / "bad.png").write_text("x")
    scorer = Scorer(loaded)
    out = tmp_path / f"res{suffix}"
    with ResultWriter(out, component_names(scorer.model, True)) as w:
        for row in score_files(scorer, [folder]):
            w.write(row)
    import pandas as pd

    df = {".csv": pd.read_csv, ".json": lambda p: pd.DataFrame(json.loads(p.read_text())), ".parquet": pd.read_parquet}[
        suffix
    ](out)
    assert list(df.columns[:6]) == ["path", "score", "score_normalized", "label", "top_component", "error"]
    assert len(df) == 4 and df["score"].notna().sum() == 3
    assert not out.with_name(f"res.partial{suffix}").exists()

    # interrupted after two rows: the file given is untouched, the rows so far are kept in a valid partial file
    out.write_text("an earlier result")
    with pytest.raises(KeyboardInterrupt):
        with ResultWriter(out, component_names(scorer.model, True)) as w:
            for n, row in enumerate(score_files(scorer, [folder])):
                if n == 2:
                    raise KeyboardInterrupt
                w.write(row)
    assert out.read_text() == "an earlier result"
    partial = out.with_name(f"res.partial{suffix}")
    read = {
        ".csv": pd.read_csv,
        ".json": lambda p: pd.DataFrame(json.loads(p.read_text())),
        ".parquet": pd.read_parquet,
    }
    assert len(read[suffix](partial)) == 2


def _brute_force_llr(model, x, z, samples):
    """L - L^{>1} for a 2-layer chain model, one input and one draw at a time (no batching tricks)."""
    from outlier_jebm.model import normal_log_density
    from outlier_jebm.scoring import LLR_SEED

    d1 = model.generator.z_dims[0]
    draws = torch.randn(samples, sum(model.generator.z_dims), generator=torch.Generator().manual_seed(LLR_SEED))
    out = []
    for b in range(x.shape[0]):
        xb, zb = x[b : b + 1], z[b : b + 1]
        z1, z2 = zb[:, :d1], zb[:, d1:]
        mu, sigma = model.generator.conditional(0, z2)
        h = model.encoder.trunk(xb)
        q_mu, q_raw = model.encoder.heads[0](h).chunk(2, dim=-1)
        log_q1 = normal_log_density(z1, q_mu, torch.nn.functional.softplus(q_raw) + 1e-3)
        full = model.log_px_given_z(xb, zb) + normal_log_density(z1, mu, sigma) - log_q1
        logs = [model.log_px_given_z(xb, torch.cat([mu + sigma * draws[s, :d1], z2], dim=-1)) for s in range(samples)]
        upper = torch.logsumexp(torch.stack(logs), dim=0) - np.log(samples)
        out.append(float(full - upper))
    return np.array(out)


def test_likelihood_ratio_matches_a_brute_force_computation(trained):
    from outlier_jebm.scoring import likelihood_ratios
    from outlier_jebm.train import to_model_space

    loaded, split = trained
    model = loaded.model.eval()
    x = to_model_space(torch.from_numpy(split.test[:6]).reshape(6, -1))
    with torch.no_grad():
        z, _ = model.encoder(x, sample=False)
        got = likelihood_ratios(model, x, z, samples=5)["llr_gt1"].numpy()
        want = _brute_force_llr(model, x, z, samples=5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_likelihood_ratio_is_the_lower_layers_kl_term_when_the_decoder_ignores_them():
    # ladder generator whose decoder reads no z_1: every prior draw of z_1 explains x exactly as
    # well as the inferred one, so L - L^{>1} = log p(z_1) - log q(z_1 | x): a known answer
    from outlier_jebm.model import standard_normal_log_density
    from outlier_jebm.scoring import likelihood_ratios

    cfg = tiny_config("ladder", "joint")
    model = JointEBM(cfg.model).eval()
    d1 = cfg.model.z_dims[0]
    with torch.no_grad():
        model.generator.decoder[0].weight[:, :d1] = 0.0
        x = torch.rand(7, 64) * 2 - 1
        z, _ = model.encoder(x, sample=False)
        llr = likelihood_ratios(model, x, z, samples=3)["llr_gt1"]
        expected = standard_normal_log_density(z[:, :d1]) - model.encoder.log_q_layers(x, z)[:, 0]
    torch.testing.assert_close(llr, expected, rtol=1e-5, atol=1e-4)


def test_likelihood_ratio_components_only_when_asked_and_deterministic(trained):
    loaded, split = trained
    assert not any(n.startswith("llr") for n in Scorer(loaded).component_names)
    loaded.config = loaded.config.with_overrides(score={"llr_samples": 4})
    try:
        scorer = Scorer(loaded)
        assert scorer.component_names[-1] == "llr_gt1"
        batch = scorer.score(split.test[:8])
        single = scorer.score(split.test[3:4])
        assert np.isfinite(batch["llr_gt1"]).all()
        np.testing.assert_allclose(single["llr_gt1"][0], batch["llr_gt1"][3], rtol=1e-4, atol=1e-4)
    finally:
        loaded.config = loaded.config.with_overrides(score={"llr_samples": 0})


def test_neg_log_joint_is_minus_the_models_log_joint_at_the_encoders_guess(trained):
    # the component is assembled from recon and the prior terms; it must equal the model's own
    # log p(x, z) with the sign flipped (higher = more anomalous)
    from outlier_jebm.train import to_model_space

    loaded, split = trained
    model = loaded.model.eval()
    images = split.test[:9]
    comps = Scorer(loaded, steps=0).components_of(images).components
    x = to_model_space(torch.from_numpy(images).reshape(len(images), -1))
    with torch.no_grad():
        z, _ = model.encoder(x, sample=False)
        want = -model.log_joint(x, z).double().numpy()
    np.testing.assert_allclose(comps["neg_log_joint"], want, rtol=1e-5, atol=1e-3)
    assert (comps["energy_drop"] == 0).all()


# one full scan; the two-stage search with padding; several chunks, the last one partial
@pytest.mark.parametrize("n_ref", [300, 1500, 20000])
def test_latent_knn_matches_brute_force_and_skips_the_input_itself(n_ref):
    from outlier_jebm.knn import Reference, knn_mean_distance

    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(n_ref, 12, generator=gen) * 3.0 + 5.0  # large norms: cancellation would show
    queries = torch.cat([torch.randn(40, 12, generator=gen) * 3.0 + 5.0, ref[:10]])  # 10 are reference rows
    got = knn_mean_distance(queries, Reference(ref), k=5).numpy()
    d = np.sqrt(((queries.double().numpy()[:, None, :] - ref.double().numpy()[None]) ** 2).sum(-1))
    d[np.arange(40, 50), np.arange(10)] = np.inf  # a reference row is not its own neighbour
    want = np.sort(d, axis=1)[:, :5].mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a plain tensor works the same as a prepared Reference
    np.testing.assert_array_equal(knn_mean_distance(queries, ref, k=5).numpy(), got)


# fewer blocks than m; one chunk; several chunks; a last chunk of fewer blocks than m
@pytest.mark.parametrize("n_ref", [200, 1500, 20000, 16570])
def test_nearest_columns_finds_the_m_smallest_products_like_a_full_sort(n_ref):
    from outlier_jebm.knn import KNN_BLOCK, Reference, knn_mean_distance, nearest_columns

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(n_ref, 12, generator=gen)
    ref[150:190] = ref[7]  # 41 equal rows over two blocks: ties
    queries = torch.cat([ref[7:8], torch.randn(8, 12, generator=gen)])
    prepared = Reference(ref)
    lifted = torch.cat([queries, torch.ones(9, 1)], dim=1)
    full = torch.cat([lifted @ chunk for chunk in prepared.chunks], dim=1)
    (idx,) = nearest_columns(lifted, prepared.chunks, prepared.chunk, 6)
    assert torch.equal(full.gather(1, idx).sort(dim=1).values, full.sort(dim=1).values[:, :6])
    assert all(len(set(row.tolist())) == 6 for row in idx)  # six different columns per row
    assert int(idx.max()) < n_ref  # a padding column is never chosen
    assert len(prepared.chunks) == (1 if n_ref < 6144 else 5)
    if n_ref == 16570:
        assert prepared.chunks[-1].shape[1] < 6 * KNN_BLOCK
    assert knn_mean_distance(torch.ones(0, 12), prepared).shape == (0,)  # an empty batch is no error


@pytest.mark.parametrize("n_ref", [200, 20000])
@pytest.mark.parametrize("zero_row", [False, True])
def test_one_product_gives_both_searches_the_values_of_two_separate_ones(n_ref, zero_row):
    from outlier_jebm.knn import References, knn_mean_distance, knn_points_and_directions, unit_rows

    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(n_ref, 16, generator=gen) * torch.rand(n_ref, 1, generator=gen) * 6.0  # norms 0-6ish
    ref[4] *= 1e-6  # a tiny norm still has a direction
    if zero_row:
        ref[3] = 0.0  # no direction: unit_rows keeps it zero, 1 from every unit vector
    ref[20:30] = ref[11] * 2.5  # one direction, several norms: ties for latent_knn_cos
    queries = torch.cat([torch.randn(30, 16, generator=gen) * 3.0, ref[:5], ref[11:12]])
    refs = References(ref)
    assert refs.shared_product is not zero_row
    knn, knn_cos = knn_points_and_directions(queries, refs)
    np.testing.assert_allclose(knn.numpy(), knn_mean_distance(queries, refs.points).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        knn_cos.numpy(), knn_mean_distance(unit_rows(queries), refs.directions).numpy(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("zero_row", [False, True])
def test_a_skipped_row_is_left_out_of_both_searches_and_the_input_itself_is_named(fused, zero_row, monkeypatch):
    from outlier_jebm import native
    from outlier_jebm.knn import References, knn_mean_distance, nearest_pair, unit_rows

    if not fused:
        monkeypatch.setattr(native, "usable_for", lambda q: False)
    gen = torch.Generator().manual_seed(9)
    ref = torch.randn(300, 12, generator=gen) * 2.0
    if zero_row:
        ref[3] = 0.0
    refs = References(ref)
    # five training rows (themselves in the reference), and five near copies of them (a moved image's code)
    queries = torch.cat([ref[10:15], ref[10:15] + 0.01 * torch.randn(5, 12, generator=gen)])
    found = nearest_pair(queries, refs)
    assert found.selves.tolist() == [10, 11, 12, 13, 14] + [-1] * 5
    skip = torch.tensor([-1] * 5 + [10, 11, 12, 13, 14])
    skipped = nearest_pair(queries, refs, skip=skip)
    np.testing.assert_array_equal(skipped.points[:5].numpy(), found.points[:5].numpy())  # -1 skips nothing
    for i in range(5, 10):  # the same as a search of the reference without the named row
        rest = torch.cat([ref[: skip[i]], ref[skip[i] + 1 :]])
        q = queries[i : i + 1]
        np.testing.assert_allclose(skipped.points[i].item(), knn_mean_distance(q, rest).item(), rtol=1e-6)
        want_cos = knn_mean_distance(unit_rows(q), unit_rows(rest)).item()
        np.testing.assert_allclose(skipped.directions[i].item(), want_cos, rtol=1e-5, atol=1e-6)
        assert skipped.points[i] > found.points[i]  # without the skip, the near copy found its own row
    assert skipped.selves.tolist() == found.selves.tolist()


@pytest.mark.parametrize("n_ref", [70, 130])  # sizes where a NaN row picked padding columns
def test_a_nan_query_gets_nan_and_leaves_the_other_rows_of_its_batch_alone(n_ref):
    from outlier_jebm.knn import References, knn_points_and_directions

    gen = torch.Generator().manual_seed(2)
    refs = References(torch.randn(n_ref, 8, generator=gen))
    queries = torch.randn(6, 8, generator=gen)
    alone = knn_points_and_directions(queries, refs)
    poisoned = queries.clone()
    poisoned[2] = float("nan")
    together = knn_points_and_directions(poisoned, refs)
    for a, b in zip(alone, together):
        assert torch.isnan(b[2])
        keep = torch.arange(6) != 2
        assert torch.equal(a[keep], b[keep])


def test_latent_knn_cos_is_the_mean_chordal_distance_to_the_nearest_directions_and_ignores_the_norm(trained):
    loaded, split = trained
    scorer = Scorer(loaded)
    bs = scorer.components_of(split.test[:40])
    ref = scorer.reference.eps.double().numpy()
    e = bs.eps.astype(np.float64)
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (ref / np.linalg.norm(ref, axis=1, keepdims=True)).T
    chord = np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, None))
    want = np.sort(chord, axis=1)[:, :5].mean(1)
    np.testing.assert_allclose(bs.components["latent_knn_cos"], want, rtol=1e-4, atol=1e-4)
    assert {"latent_knn", "latent_knn_cos"} <= set(scorer.component_names)
    # the direction, not the norm: scaling a code leaves its latent_knn_cos unchanged
    from outlier_jebm.knn import knn_mean_distance, unit_rows

    eps = torch.from_numpy(bs.eps)
    np.testing.assert_allclose(
        knn_mean_distance(unit_rows(3.0 * eps), scorer.reference.directions).numpy(),
        bs.components["latent_knn_cos"],
        rtol=1e-5,
        atol=1e-6,
    )


def _brute_force_knn(e: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean Euclidean distance to the k nearest reference rows, and the same between unit directions."""
    dist = np.sqrt(((e[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    chord = np.sqrt(np.clip(2.0 - 2.0 * unit(e) @ unit(ref).T, 0.0, None))
    return np.sort(dist, axis=1)[:, :k].mean(1), np.sort(chord, axis=1)[:, :k].mean(1)


def test_latent_knn_top_searches_the_top_layer_alone_by_brute_force(trained):
    import copy

    loaded, split = trained
    assert "latent_knn_top" not in Scorer(loaded).component_names  # off by default (score.top_knn)
    loaded = copy.copy(loaded)
    loaded.config = loaded.config.with_overrides(score={"top_knn": True})
    scorer = Scorer(loaded)
    top = loaded.config.model.z_dims[-1]
    assert {"latent_knn_top", "latent_knn_cos_top"} <= set(scorer.component_names)
    bs = scorer.components_of(split.test[:40])
    ref = scorer.reference.eps.double().numpy()[:, -top:]  # the top layer's coordinates: the last of eps
    points, directions = _brute_force_knn(bs.eps.astype(np.float64)[:, -top:], ref, 5)
    np.testing.assert_allclose(bs.components["latent_knn_top"], points, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bs.components["latent_knn_cos_top"], directions, rtol=1e-4, atol=1e-4)
    # not the full code's search: the lower layer changes latent_knn but not latent_knn_top
    assert not np.allclose(bs.components["latent_knn_top"], bs.components["latent_knn"])


@pytest.mark.parametrize("k", [1, 12])
def test_knn_k_sets_how_many_neighbours_both_searches_average(trained, k):
    import copy

    loaded, split = trained
    loaded = copy.copy(loaded)
    loaded.config = loaded.config.with_overrides(score={"knn_k": k})
    scorer = Scorer(loaded)
    bs = scorer.components_of(split.test[:40])
    points, directions = _brute_force_knn(bs.eps.astype(np.float64), scorer.reference.eps.double().numpy(), k)
    np.testing.assert_allclose(bs.components["latent_knn"], points, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bs.components["latent_knn_cos"], directions, rtol=1e-4, atol=1e-4)


def test_reference_size_sets_how_many_training_images_latent_knn_searches(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from outlier_jebm.config import ConfigError, ScoreConfig
    from outlier_jebm.scoring import REFERENCE_FILE

    loaded, split = trained
    copy = tmp_path / "m"
    shutil.copytree(loaded.path, copy)
    for size, rows in [(0, len(split.train)), (50, 50), (10**6, len(split.train))]:
        calibrate(load_model(copy), split.train, split.val, reference_size=size)
        assert load_file(str(copy / REFERENCE_FILE))["eps"].shape[0] == rows
        assert len(Scorer(load_model(copy)).reference) == rows
    with pytest.raises(ConfigError, match="reference_size"):
        ScoreConfig(reference_size=-1).validate()


def test_posterior_averages_are_the_mean_over_the_chains_final_samples(trained, monkeypatch):
    from outlier_jebm import scoring
    from outlier_jebm.config import ScoreConfig

    loaded, split = trained
    model = loaded.model
    x = model.to_model_space(split.test[:12], "cpu")
    cfg = ScoreConfig(steps=3, step_size=0.05, noise=True, chains=4)
    seen = {}
    real = scoring.posterior_langevin

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["z"] = out[0].clone()
        return out

    monkeypatch.setattr(scoring, "posterior_langevin", spy)
    bs = scoring.infer_and_score(model, x, cfg)
    zc = seen["z"].view(4, 12, -1)
    want = torch.stack([model.log_joint(x, zc[c]) for c in range(4)]).mean(0)
    np.testing.assert_allclose(bs.components["neg_log_joint_post"], -want.detach().numpy(), rtol=1e-4, atol=1e-3)
    # the average over the samples, not the value at their mean
    assert not np.allclose(bs.components["neg_log_joint_post"], bs.components["neg_log_joint"])
    assert "neg_log_joint_post" in scoring.component_names(model, False, posterior=scoring.posterior_averaged(cfg))
    assert "neg_log_joint_post" not in scoring.component_names(
        model, False, posterior=scoring.posterior_averaged(ScoreConfig(steps=3, noise=False, chains=1))
    )


def test_curves_rank_non_finite_scores_as_the_metrics_do_and_do_not_fail():
    import matplotlib.pyplot as plt

    from outlier_jebm.evaluate import curve_figures

    y = np.array([0, 0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.2, np.nan, 0.9, np.inf, -np.inf])
    figs = curve_figures(y, scores, threshold=0.5, title="t")
    assert set(figs) == {"pr_curve.png", "roc_curve.png", "score_histogram.png"}
    assert "(3 non-finite not shown)" in figs["score_histogram.png"].axes[0].get_title()
    # NaN and +inf rank as the most anomalous (tied), -inf as the least: the normal NaN is the top false alarm
    from sklearn.metrics import roc_auc_score

    big = np.finfo(np.float64).max
    want = roc_auc_score(y, [0.1, 0.2, big, 0.9, big, -big])
    assert detection_metrics(y, scores)["auroc"] == pytest.approx(want) and want < 1
    for f in figs.values():
        plt.close(f)


def test_shifted_copies_move_the_image_by_whole_pixels_and_repeat_the_edge():
    from outlier_jebm.shifts import shifted_copies

    img = np.zeros((5, 6, 3), dtype=np.float32)
    img[2, 3] = [1.0, 2.0, 3.0]
    img[:, 0] = 7.0  # the left column: repeated into the gap when the image moves right
    moved = shifted_copies(torch.from_numpy(img).reshape(1, -1), (5, 6, 3), 1).numpy().reshape(4, 5, 6, 3)
    want = []
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # down, up, right, left
        padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        want.append(padded[1 - dy : 6 - dy, 1 - dx : 7 - dx])
    np.testing.assert_array_equal(moved, np.stack(want))
    assert moved[0][3, 3, 2] == 3.0 and moved[2][2, 4, 0] == 1.0 and (moved[2][:, :2] == 7.0).all()


@pytest.mark.parametrize("steps", [0, 2])  # the moved copies go through the same posterior Langevin steps
def test_shifts_make_each_latent_knn_the_smallest_over_the_image_and_its_four_moves(trained, steps):
    import copy

    from outlier_jebm.config import ConfigError
    from outlier_jebm.knn import knn_mean_distance
    from outlier_jebm.shifts import shifted_copies

    loaded, split = trained
    images = split.test[:30]
    plain = Scorer(loaded, steps=steps)
    moved = copy.copy(loaded)
    moved.config = loaded.config.with_overrides(score={"shifts": 1})
    got = Scorer(moved, steps=steps).components_of(images).components
    x = loaded.model.to_model_space(images)
    copies = (shifted_copies(x, images.shape[1:], 1).numpy() + 1.0) / 2.0  # back to [0, 1] images
    each = [plain.components_of(images).components] + [
        plain.components_of(part.reshape(images.shape)).components for part in np.split(copies, 4)
    ]
    for name in ("latent_knn", "latent_knn_cos"):
        np.testing.assert_allclose(got[name], np.min([c[name] for c in each], axis=0), rtol=1e-5, atol=1e-6)
        assert (got[name] < each[0][name] - 1e-6).any()  # some image is nearer a training image once moved
    for name in ("recon", "posterior_width", "neg_log_joint"):  # the other components read the image as given
        np.testing.assert_allclose(got[name], each[0][name], rtol=1e-6)
    for bad in ({"shifts": -1}, {"shifts": True}, {"shifts": 4}):  # 8-pixel images: 4 is half their size
        with pytest.raises(ConfigError, match="score.shifts"):
            loaded.config.with_overrides(score=bad)
    with pytest.raises(ConfigError, match="score.shifts"):
        loaded.config.with_overrides(model={"data_kind": "vector", "vector_dim": 5}, score={"shifts": 1})
    if steps:  # at K > 0 a training image's code leaves its reference row (the encoder's), and nothing is skipped
        return
    # a training image's moved copies do not find the image itself in the reference, as the image does not: smooth
    # images (a pixel's move changes them little) join the reference, so that their moved copies land near their rows
    from scipy.ndimage import gaussian_filter

    from outlier_jebm.scoring import reference_set

    train = gaussian_filter(split.train[:12], sigma=(0, 2, 2))
    ref = torch.cat([plain.reference.points.eps, torch.from_numpy(plain.components_of(train).eps)])
    shifted = Scorer(moved, steps=steps)
    plain.reference = shifted.reference = reference_set(loaded.model, ref)
    got = shifted.components_of(train).components
    base = plain.components_of(train)
    copies = (shifted_copies(loaded.model.to_model_space(train), train.shape[1:], 1).numpy() + 1.0) / 2.0
    moved_eps = [torch.from_numpy(plain.components_of(p.reshape(train.shape)).eps) for p in np.split(copies, 4)]
    nearer = 0
    for i in range(len(train)):
        own = len(ref) - len(train) + i
        assert (ref[own] - torch.from_numpy(base.eps[i])).norm() < 1e-5  # the image is in the reference
        rest = torch.cat([ref[:own], ref[own + 1 :]])
        want = min(
            [base.components["latent_knn"][i]] + [knn_mean_distance(e[i : i + 1], rest).item() for e in moved_eps]
        )
        np.testing.assert_allclose(got["latent_knn"][i], want, rtol=1e-5, atol=1e-6)
        nearer += min(knn_mean_distance(e[i : i + 1], ref).item() for e in moved_eps) < want - 1e-4
    assert nearer >= 6  # most moved copies would have found their own image
