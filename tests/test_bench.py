import csv
import json
import os
import sqlite3
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from jebm_od.cli.bench_spec import parse_detectors, parse_seconds
from jebm_od.cli.main import app
from outlier_jebm.bench import (
    PYOD_DETECTORS,
    SKIPPED_BUDGET,
    BenchError,
    BenchSpec,
    JEBMVariant,
    PyODDetector,
    pixel_features,
    run_bench,
)
from outlier_jebm.evaluate import detection_metrics
from outlier_jebm.pipeline import prepare_data

runner = CliRunner()
REQUIRED = {"detector", "holdout", "seed", "auprc", "auroc", "fit_seconds", "score_images_per_second"}


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _digits_split(holdout=1, seed=0):
    return prepare_data(
        "digits", holdout=holdout, seed=seed, val_fraction=tiny_config().train.val_fraction, image_size=8
    )


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = tmp / "tiny.yaml"
    # samples of the fitted models run 12 prior Langevin steps (training runs 10)
    cfg.write_text(yaml.safe_dump(tiny_config(sample_steps=12).to_dict()))
    db = tmp / "mlflow.db"
    args = [
        "bench",
        "--data",
        "digits",
        "--holdout",
        "1",
        "--seeds",
        "0,1",
        "--config",
        str(cfg),
        "--detectors",
        "jebm,pca,knn,iforest",
        "--jebm-variant",
        "gauss=prior=gaussian",
        "--out",
        str(tmp / "out"),
        "--tracking-uri",
        f"sqlite:///{db}",
    ]
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(tmp)
    # one torch thread: on a 2-core machine shared with other jobs, two spinning OpenMP threads made this
    # run take 18 s or 111 s depending on the neighbours; the claims tested here do not depend on speed
    torch.set_num_threads(1)
    try:
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return tmp, res, _read_csv(tmp / "out" / "results.csv"), db


def test_bench_writes_one_row_per_detector_split_with_valid_metrics(bench_run):
    tmp, res, rows, _ = bench_run
    assert REQUIRED <= set(rows[0])
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        assert 0.0 <= float(r["auprc"]) <= 1.0 and 0.0 <= float(r["auroc"]) <= 1.0
        assert float(r["fit_seconds"]) > 0 and float(r["score_images_per_second"]) > 0
    for det in ("jebm", "gauss", "pca", "knn", "iforest"):
        assert {(r["holdout"], r["seed"]) for r in rows if r["detector"] == det} == {("1", "0"), ("1", "1")}
    # one split per (digit, seed), shared by every detector: the split prepare_data makes
    for seed in (0, 1):
        split = _digits_split(seed=seed)
        cell = [r for r in rows if r["seed"] == str(seed)]
        assert {int(r["n_test"]) for r in cell} == {len(split.test)}
        assert {int(r["n_train"]) for r in cell} == {len(split.train) + len(split.val)}
        assert all(float(r["anomaly_rate"]) == pytest.approx(split.test_is_anomaly.mean(), abs=1e-5) for r in cell)
    # the screen shows each finished cell as it finishes, component rows by their full name
    assert "jebm[latent_knn]" in res.output and "AUPRC" in res.output


def test_pca_baseline_gives_finite_scores(bench_run):
    _, _, rows, _ = bench_run
    pca = [r for r in rows if r["detector"] == "pca"]
    assert pca and all(r["nonfinite_scores"] == "0" for r in pca)


def test_one_jebm_fit_gives_rows_for_the_score_and_each_component(bench_run):
    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.scoring import Scorer

    tmp, _, rows, _ = bench_run
    names = {r["detector"] for r in rows}
    assert {"jebm[latent_knn]", "jebm[recon]", "jebm[neg_f]", "jebm[neg_log_joint]", "gauss[latent_knn]"} <= names
    assert "gauss[neg_f]" not in names  # the Gaussian prior has no EBM term
    assert "jebm[chain_spread]" not in names  # constant with one chain: no ranking to report
    jebm_rows = [r for r in rows if r["model"] == "jebm" and r["seed"] == "0"]
    assert len({r["fit_seconds"] for r in jebm_rows}) == 1  # one fit shared by the model's rows
    # the rows are what the product's Scorer gives for the saved model
    model_dir = tmp / "out" / "models" / "jebm-holdout1-seed0"
    table = Scorer(load_model(model_dir)).score(_digits_split().test)
    y = _digits_split().test_is_anomaly
    by_name = {r["detector"]: r for r in jebm_rows}
    assert float(by_name["jebm"]["auprc"]) == pytest.approx(detection_metrics(y, table["score"])["auprc"], abs=1e-5)
    recon = detection_metrics(y, table["recon"])["auroc"]
    assert float(by_name["jebm[recon]"]["auroc"]) == pytest.approx(recon, abs=1e-5)
    # the row names the model inside the output folder, not by an absolute path
    assert (
        by_name["jebm"]["note"].endswith("; model models/jebm-holdout1-seed0")
        and str(tmp) not in by_name["jebm"]["note"]
    )
    assert not (tmp / "models" / "latest").exists()  # a bench does not change the user's last fitted model
    # the fit's sample quality is on the model's own row, not on its components' rows or PyOD's
    assert float(by_name["jebm"]["sample_fid_lenet"]) > 0 and 0 < float(by_name["jebm"]["sample_confidence"]) <= 1
    assert by_name["jebm[recon]"]["sample_fid_lenet"] == ""
    # the chain length behind the figure: the config's sample_steps, and none for the Gaussian prior's exact samples
    assert load_model(model_dir).config.train.prior_langevin.steps == 10
    assert by_name["jebm"]["sample_steps"] == "12"
    (gauss,) = [r for r in rows if r["detector"] == "gauss" and r["seed"] == "0"]
    assert gauss["sample_steps"] == "0" and float(gauss["sample_fid_lenet"]) > 0
    assert all(r["sample_fid_lenet"] == "" for r in rows if r["family"] == "pyod")


def test_results_markdown_settings_figures_and_mlflow_runs(bench_run):
    tmp, _, rows, db = bench_run
    out = tmp / "out"
    md = (out / "results.md").read_text()
    assert "## Summary: AUPRC" in md and "## Holdout 1" in md and "| knn |" in md and " ± " in md
    assert "## Sample quality: FID (in-project LeNet features) / LeNet confidence" in md
    # each model's row names the prior chain's length behind its samples: the config's 12, none for the Gaussian
    assert "| jebm | 12 | " in md and "| gauss | 0 | " in md
    assert (out / "pr_holdout1.png").stat().st_size > 1000
    settings = json.loads((out / "settings.json").read_text())
    assert settings["detectors"]["pca"]["changed_from_defaults"]["standardization"] is False
    assert settings["detectors"]["pca"]["params"]["n_components"] == 0.95
    assert settings["detectors"]["gauss"]["config"]["model"]["prior"] == "gaussian"
    assert settings["jebm_base_config"]["model"]["image_size"] == 8
    assert {"cpu_count", "torch_threads", "platform", "date", "git_commit"} <= set(settings["machine"])
    with sqlite3.connect(db) as con:
        tags = con.execute("select run_uuid, key, value from tags").fetchall()
    per_run: dict[str, dict[str, str]] = {}
    for run, key, value in tags:
        per_run.setdefault(run, {})[key] = value
    for r in rows:
        t = per_run[r["mlflow_run_id"]]
        assert (t["job"], t["detector"], t["holdout"], t["seed"]) == ("bench", r["detector"], r["holdout"], r["seed"])


def test_a_zero_time_budget_skips_every_cell_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config().to_dict()))
    res = runner.invoke(
        app,
        [
            "bench",
            "--data",
            "digits",
            "--holdout",
            "1,3",
            "--config",
            str(cfg),
            "--detectors",
            "jebm[latent_knn],pca",
            "--components",
            "none",
            "--time-budget",
            "0",
            "--out",
            "out",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'db'}",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert {(r["detector"], r["holdout"]) for r in rows} == {
        (d, h) for d in ("jebm", "jebm[latent_knn]", "pca") for h in ("1", "3")
    }
    assert all(r["status"] == SKIPPED_BUDGET and r["auprc"] == "" for r in rows)
    assert not (tmp_path / "out" / "models").exists()
    assert "skipped: time budget" in (tmp_path / "out" / "results.md").read_text()


class SlowDetector:
    """Stands in for a detector whose fit outlasts the budget."""

    def __init__(self, **kwargs):
        pass

    def get_params(self):
        return {}

    def fit(self, X):
        time.sleep(0.4)
        return self

    def decision_function(self, X):
        return X.sum(1)


def test_cells_that_would_start_after_the_budget_are_skipped_the_rest_kept(tmp_path):
    slow = PyODDetector("slow", f"{__name__}.SlowDetector", {}, "test stand-in")
    spec = BenchSpec(
        data="digits",
        holdouts=[1, 3],
        seeds=[0],
        detectors=[slow, PYOD_DETECTORS["pca"]],
        base_config=tiny_config(),
        out_dir=tmp_path / "out",
        time_budget=0.3,
        track=False,
    )
    rows = run_bench(spec).rows
    assert [(r["detector"], r["holdout"], r["status"]) for r in rows] == [
        ("slow", 1, "ok"),
        ("pca", 1, SKIPPED_BUDGET),
        ("slow", 3, SKIPPED_BUDGET),
        ("pca", 3, SKIPPED_BUDGET),
    ]
    assert len(_read_csv(tmp_path / "out" / "results.csv")) == 4


def test_pyod_default_pca_is_infinite_on_pixels_and_the_registered_setting_is_not():
    from pyod.models.pca import PCA

    split = _digits_split()
    X = pixel_features(np.concatenate([split.train, split.val]))
    T = pixel_features(split.test)
    with np.errstate(all="ignore"):
        assert not np.isfinite(PCA().fit(X).decision_function(T)).all()
    scores = PYOD_DETECTORS["pca"].build(0, X.shape[1]).fit(X).decision_function(T)
    assert np.isfinite(scores).all()
    assert detection_metrics(split.test_is_anomaly, scores)["auprc"] > split.test_is_anomaly.mean()


@pytest.mark.parametrize("name", ["knn", "lof", "iforest", "ecod", "copod", "loda"])
def test_registered_pyod_detectors_give_one_finite_score_per_test_image(name):
    split = _digits_split()
    X = pixel_features(np.concatenate([split.train, split.val]))
    T = pixel_features(split.test)
    scores = PYOD_DETECTORS[name].build(0, X.shape[1]).fit(X).decision_function(T)
    assert scores.shape == (len(T),) and np.isfinite(scores).all()


def test_detector_list_parses_variants_components_and_rejects_mistakes():
    base = tiny_config()
    entries = parse_detectors(
        "jebm[latent_knn+recon],knn,jebm:prior=layerwise:steps=3,big",
        base,
        variants={"big": "z_dims=[8,4],train.prior_langevin.steps=12"},
        components="none",
    )
    assert [e.name for e in entries] == ["jebm", "knn", "jebm:prior=layerwise:steps=3", "big"]
    jebm, _, layerwise, big = entries
    assert isinstance(jebm, JEBMVariant) and jebm.components == ["latent_knn", "recon"]
    assert layerwise.config.model.prior == "layerwise" and layerwise.config.score.steps == 3
    assert big.config.model.z_dims == [8, 4] and big.config.train.prior_langevin.steps == 12
    assert big.config.model.image_size == 8  # everything else from the base config
    (small,) = parse_detectors("jebm:z_dims=[4,2][recon]", base, components="none")
    assert small.name == "jebm:z_dims=[4,2]" and small.config.model.z_dims == [4, 2] and small.components == ["recon"]
    with pytest.raises(BenchError, match="unknown detector"):
        parse_detectors("jebm,knnn", base)
    with pytest.raises(BenchError, match="unknown config"):
        parse_detectors("jebm:model.priorr=joint", base)
    with pytest.raises(BenchError, match="prior"):
        parse_detectors("jebm:prior=bogus", base)
    with pytest.raises(BenchError, match="one split"):
        parse_detectors("jebm:model.image_size=28", base)
    with pytest.raises(BenchError, match="no component"):
        parse_detectors("jebm:prior=gaussian[neg_f]", base, components="none")
    assert parse_seconds("90") == 90 and parse_seconds("30m") == 1800 and parse_seconds("1.5h") == 5400


def test_cli_reports_a_bad_detector_list_as_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["bench", "--data", "digits", "--detectors", "jebm,nope", "--out", "out"])
    assert res.exit_code == 2 and "unknown detector 'nope'" in res.output
    assert not (tmp_path / "out").exists()


def test_every_progress_line_stays_one_line_in_a_narrow_terminal_or_a_log(tmp_path):
    # a log file gets 80 columns; a row, a path or an epoch line broken over several lines cannot be grepped
    out = tmp_path / ("a-long-output-folder-name-" * 3)
    args = ["bench", "--data", "digits", "--holdout", "1", "--detectors", "pca", "--no-track", "--out", str(out)]
    res = runner.invoke(app, args, env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(ln.startswith("bench: 1 detectors x holdout 1") and ln.endswith(f"-> {out}") for ln in lines)
    row = next(ln for ln in lines if ln.startswith("holdout 1 seed 0  pca"))
    assert "AUPRC" in row and "AUROC" in row and row.rstrip().endswith("img/s")
    assert any(f"{out / 'results.csv'}" in ln and ln.rstrip().endswith(f"{out / 'settings.json'}") for ln in lines)
    assert f"figure:  {out / 'pr_holdout1.png'}" in lines


def test_both_splits_run_side_by_side_in_one_report(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "bench",
            "--data",
            "mnist",
            "--holdout",
            "1",
            "--detectors",
            "pca",
            "--max-train",
            "2000",
            "--split",
            "clean,published",
            "--no-track",
            "--out",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    rows = _read_csv(out / "results.csv")
    assert [(r["detector"], r["split"]) for r in rows] == [("pca", "clean"), ("pca", "published")]
    leak = {r["split"]: float(r["test_in_train"]) for r in rows}
    assert leak["clean"] == 0.0 and 0.75 < leak["published"] < 0.85
    md = (out / "results.md").read_text()
    assert "| pca (clean) |" in md and "| pca (published) |" in md
    assert "best PyOD (picked per hold-out on test labels, clean split)" in md
    assert "best PyOD (picked per hold-out on test labels, published split)" in md
    assert (out / "pr_holdout1.png").is_file() and (out / "pr_holdout1-published.png").is_file()

    res = runner.invoke(
        app,
        ["bench", "--data", "mnist", "--detectors", "pca", "--split", "clean,leaky", "--out", str(tmp_path / "x")],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 2 and "split 'leaky'" in res.output and not (tmp_path / "x").exists()


class CrashingDetector(SlowDetector):
    """Takes its worker process down, as the kernel's OOM killer would."""

    def fit(self, X):
        os._exit(3)


def _spec(tmp_path, detectors, **kw):
    return BenchSpec(
        **{
            "data": "digits",
            "holdouts": [1, 3],
            "seeds": [0],
            "detectors": detectors,
            "base_config": tiny_config(),
            "out_dir": tmp_path,
            "track": False,
            **kw,
        }
    )


def test_cells_in_two_worker_processes_give_the_rows_of_one_process_in_the_same_order(tmp_path):
    dets = parse_detectors("jebm,pca,knn", tiny_config(), components="recon")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs, so that the jebm fits are the same computation
    try:
        one = run_bench(_spec(tmp_path / "one", dets)).rows
    finally:
        torch.set_num_threads(threads)
    messages = []
    two = run_bench(_spec(tmp_path / "two", dets, jobs=2, job_threads=1), on_message=messages.append).rows

    def key(rows):
        return [(r["detector"], r["holdout"], r["split"], r["status"], r["auprc"]) for r in rows]

    assert len(one) == 2 * 4 and all(r["status"] == "ok" for r in one)
    assert key(two) == key(one)  # bit for bit, and written in cell order
    # the sample FID's matrix square root runs in BLAS, whose thread count may differ: equal to rounding
    fids = [(a["sample_fid_lenet"], b["sample_fid_lenet"]) for a, b in zip(one, two) if a["sample_fid_lenet"] != ""]
    assert len(fids) == 2 and all(b == pytest.approx(a, rel=1e-6) for a, b in fids)
    assert [r["detector"] for r in _read_csv(tmp_path / "two" / "results.csv")] == [r["detector"] for r in one]
    assert "2 worker processes, 1 thread(s) each" in messages
    # the workers' progress reaches the parent: the split and the jebm epochs
    assert any(m.startswith("holdout 3 seed 0:") for m in messages)
    assert any("jebm holdout 1 seed 0: epoch 1/" in m for m in messages)
    epoch_lines = [m for m in messages if ": epoch " in m]
    assert all("val recon" in m and "val -ELBO " in m for m in epoch_lines)  # variational: the -ELBO is not flagged
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["jobs"] == 2


def test_an_mle_cell_marks_the_held_in_elbo_and_says_why(tmp_path):
    from outlier_jebm.train import MLE_ELBO_NOTE

    (mle,) = parse_detectors("jebm:scheme=mle:train.epochs=1", tiny_config(), components="none")
    messages = []
    rows = run_bench(_spec(tmp_path, [mle], holdouts=[3]), on_message=messages.append).rows
    assert [r["status"] for r in rows] == ["ok"]
    epoch_lines = [m for m in messages if ": epoch 1/" in m]
    assert epoch_lines and all("val -ELBO* " in m and "val recon " in m for m in epoch_lines)
    assert sum(MLE_ELBO_NOTE in m for m in messages) == 1


def test_a_cell_that_kills_its_worker_gets_a_failed_row_and_the_other_cells_keep_theirs(tmp_path):
    crash = PyODDetector("crash", f"{__name__}.CrashingDetector", {}, "test stand-in")
    rows = run_bench(_spec(tmp_path, [crash, PYOD_DETECTORS["pca"]], jobs=2, job_threads=1)).rows
    assert [(r["detector"], r["holdout"]) for r in rows] == [("crash", 1), ("pca", 1), ("crash", 3), ("pca", 3)]
    for r in rows:
        if r["detector"] == "crash":
            assert r["status"] == "failed: its bench worker process died (exit code 3; killed for memory?)"
        else:
            assert r["status"] == "ok" and 0 < r["auprc"] <= 1


def test_in_workers_cells_past_the_budget_are_skipped_and_bad_settings_are_refused(tmp_path):
    rows = run_bench(_spec(tmp_path / "a", [PYOD_DETECTORS["pca"]], jobs=2, time_budget=0.0)).rows
    assert [r["status"] for r in rows] == [SKIPPED_BUDGET, SKIPPED_BUDGET]
    with pytest.raises(BenchError, match="at least 1"):
        run_bench(_spec(tmp_path / "b", [PYOD_DETECTORS["pca"]], jobs=0))
    with pytest.raises(BenchError, match="at least 1"):
        run_bench(_spec(tmp_path / "c", [PYOD_DETECTORS["pca"]], jobs=2, job_threads=0))
    (a,) = parse_detectors("jebm:prior=gaussian", tiny_config())
    b = JEBMVariant("jebm_prior_gaussian", a.overrides, a.config)  # a --jebm-variant named like a's folder
    with pytest.raises(BenchError, match="would share model folders"):
        run_bench(_spec(tmp_path / "d", [a, b], jobs=2))


def test_a_data_error_in_a_worker_reaches_the_caller_as_in_one_process(tmp_path):
    from outlier_jebm.data import DataError

    for jobs in (1, 2):
        spec = _spec(tmp_path / str(jobs), [PYOD_DETECTORS["pca"]], jobs=jobs)
        spec.data = str(tmp_path / "no-such-folder")
        with pytest.raises(DataError, match="no-such-folder"):
            run_bench(spec)
        assert _read_csv(tmp_path / str(jobs) / "results.csv") == []  # written whole, with what was measured
