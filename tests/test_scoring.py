import json

import numpy as np
import pytest
import torch
from PIL import Image

from outlier_jebm.batch import ResultWriter, score_files
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import holdout_split, load_digits
from outlier_jebm.evaluate import detection_metrics
from outlier_jebm.model import JointEBM
from outlier_jebm.scoring import DEFAULT_COMBINATION, Scorer, calibrate, component_names, fit_calibration
from outlier_jebm.train import fit

from conftest import tiny_config


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


def test_calibration_never_reads_anomaly_labels(trained):
    # the calibration is a function of held-in validation images only: shuffling or flipping the
    # test labels, or dropping all anomalies from the test part, cannot change it
    loaded, split = trained
    comps = Scorer(loaded).components_of(split.val).components
    cal = fit_calibration(comps, combine=DEFAULT_COMBINATION, false_alarm_rate=0.05, score_steps=0)
    assert cal.to_dict() == loaded.calibration
    s = cal.score(comps)
    assert np.mean(s > cal.threshold) == pytest.approx(0.05, abs=0.02)
    assert np.mean(cal.normalize(s) > 0.5) == pytest.approx(np.mean(s > cal.threshold))
    assert cal.normalize(np.array([cal.threshold]))[0] == pytest.approx(0.5)


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

    df = {".csv": pd.read_csv, ".json": lambda p: pd.DataFrame(json.loads(p.read_text())), ".parquet": pd.read_parquet}[suffix](out)
    assert list(df.columns[:6]) == ["path", "score", "score_normalized", "label", "top_component", "error"]
    assert len(df) == 4 and df["score"].notna().sum() == 3
