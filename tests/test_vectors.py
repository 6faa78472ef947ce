"""Plain feature vectors end to end: a table fitted and scored by the CLI, served, and in the pyfunc."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import free_port
from sklearn.metrics import roc_auc_score
from test_detector import tiny_vector_config
from test_serving import _start, _stop
from typer.testing import CliRunner

from jebm_od.cli.main import app
from outlier_jebm.checkpoint import load_model
from outlier_jebm.scoring import Scorer
from outlier_jebm.tables import load_vector_dataset, vector_holdout_split

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
D = 5


def table(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """Correlated features on unlike scales: normal rows lie near a line, shifted rows off it."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, 1))
    X = np.hstack([t, 2 * t, -t, t + 0.1 * rng.normal(size=(n, 1)), 0.5 * t]) + 0.05 * rng.normal(size=(n, D))
    X[:, 1] += shift
    return pd.DataFrame(X * [1, 100, 0.01, 10, 1000], columns=[f"f{i}" for i in range(D)])


@pytest.fixture(scope="module")
def vector_model(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("vectors")
    train = work / "train.csv"
    table(400, 0).to_csv(train, index=False)
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_vector_config(min_steps=200).to_dict()))
    with contextlib.chdir(work):  # models/latest lands in the tmp dir
        res = runner.invoke(
            app,
            [
                "fit",
                "--data",
                str(train),
                "--config",
                str(cfg),
                "--out",
                str(work / "m"),
                "--tracking-uri",
                f"sqlite:///{work / 'db.sqlite'}",
            ],
        )
    assert res.exit_code == 0, res.output
    assert "vectors" in res.output
    return {"dir": work / "m", "work": work}


def test_cli_fits_a_csv_table_and_scores_it_row_by_row(vector_model, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    work = vector_model["work"]
    normal, odd = table(40, 1), table(10, 2, shift=3.0)
    test = pd.concat([normal, odd], ignore_index=True)
    test.iloc[3, 2] = np.nan  # one bad row, reported on its own
    test.to_csv(work / "test.csv", index=False)
    res = runner.invoke(
        app, ["score", str(work / "test.csv"), "--model", str(vector_model["dir"]), "--out", str(work / "scores.csv")]
    )
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(work / "scores.csv")
    assert len(rows) == 50 and rows["path"].iloc[0].endswith("test.csv:0")
    assert rows.loc[3, "error"] == "NaN or infinite value" and rows["error"].drop(3).isna().all()
    ok = rows.drop(3)
    is_odd = (ok.index >= 40).astype(int)
    assert roc_auc_score(is_odd, ok["score"]) > 0.9
    # the same scores as the library's Scorer
    scorer = Scorer(load_model(vector_model["dir"]))
    want = scorer.score(test.drop(3).to_numpy(np.float32))["score"]
    np.testing.assert_allclose(ok["score"].to_numpy(), want, rtol=1e-5, atol=1e-5)
    # columns are matched by the names the model was fitted on: another order plus the index column pandas writes
    # score the same; a table without one of them, or an array of the wrong width, is one error row saying why
    test.iloc[:, ::-1].to_csv(work / "shuffled.csv", index=True)
    res = runner.invoke(
        app, ["score", str(work / "shuffled.csv"), "--model", str(vector_model["dir"]), "--out", str(work / "s2.csv")]
    )
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(pd.read_csv(work / "s2.csv")["score"].drop(3).to_numpy(), want, rtol=1e-5, atol=1e-5)
    assert load_model(vector_model["dir"]).meta["feature_names"] == [f"f{i}" for i in range(D)]
    before = (work / "test.csv").read_bytes()  # --out naming an input is refused, before anything is written
    same = str(work / "test.csv")
    res = runner.invoke(app, ["score", same, "--model", str(vector_model["dir"]), "--out", same])
    assert res.exit_code == 2 and "is one of the inputs" in " ".join(res.output.split()), res.output
    assert (work / "test.csv").read_bytes() == before
    table(3, 3).iloc[:, :4].to_csv(work / "narrow.csv", index=False)
    res = runner.invoke(app, ["score", str(work / "narrow.csv"), "--model", str(vector_model["dir"])])
    assert res.exit_code == 1 and "column(s) f4 missing" in " ".join(res.output.split())
    # another header of the same width (pandas' 0, 1, ...) carries none of the names: read by position, as before
    test.set_axis(range(D), axis=1).to_csv(work / "plain.csv", index=False)
    res = runner.invoke(
        app, ["score", str(work / "plain.csv"), "--model", str(vector_model["dir"]), "--out", str(work / "s3.csv")]
    )
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(pd.read_csv(work / "s3.csv")["score"].drop(3).to_numpy(), want, rtol=1e-5, atol=1e-5)
    np.save(work / "narrow.npy", table(3, 3).iloc[:, :4].to_numpy())
    res = runner.invoke(app, ["score", str(work / "narrow.npy"), "--model", str(vector_model["dir"])])
    assert res.exit_code == 1 and "4 features, but the model was fitted on 5" in res.output
    res = runner.invoke(app, ["score", str(work / "test.csv"), "--model", str(vector_model["dir"]), "--maps", "m"])
    assert res.exit_code == 2 and "vector model" in res.output
    res = runner.invoke(app, ["sample", "--model", str(vector_model["dir"]), "--out", str(work / "s.png")])
    assert res.exit_code == 2 and "samples are not images" in " ".join(res.output.split())


def test_serve_takes_json_lists_of_numbers_and_npy_vectors(vector_model):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jebm_od.cli.main",
        "serve",
        "--model",
        str(vector_model["dir"]),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = _start(cmd, port, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        X = table(6, 4).to_numpy(np.float32)
        want = Scorer(load_model(vector_model["dir"])).score(X)["score"]
        r = httpx.post(f"{url}/v1/score", json={"instances": X.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([p["score"] for p in r.json()["predictions"]], want, rtol=1e-5, atol=1e-5)
        instances = [X[0].tolist(), X[1, :3].tolist(), "seven", X[2].tolist()]
        preds = httpx.post(f"{url}/v1/score", json={"instances": instances}, timeout=30).json()["predictions"]
        assert preds[1]["error"].startswith("instances[1]: 3 values") and "instances[2]" in preds[2]["error"]
        np.testing.assert_allclose([preds[0]["score"], preds[3]["score"]], want[[0, 2]], rtol=1e-5, atol=1e-5)
        buf = io.BytesIO()
        np.save(buf, X)
        r = httpx.post(
            f"{url}/v1/score", content=buf.getvalue(), headers={"content-type": "application/x-npy"}, timeout=30
        )
        np.testing.assert_allclose([p["score"] for p in r.json()["predictions"]], want, rtol=1e-5, atol=1e-5)
        r = httpx.post(f"{url}/v1/score", files=[("file", ("a.png", b"x", "image/png"))], timeout=30)
        assert r.status_code == 415 and "vector model" in r.json()["error"]
        info = httpx.get(f"{url}/v1/model").json()
        assert info["data_kind"] == "vector" and info["input_shape"] == [D]
    finally:
        _stop(proc)


def test_pyfunc_takes_numeric_columns_and_arrays_of_vectors(vector_model, tmp_path):
    import mlflow

    from outlier_jebm.registry import save_pyfunc

    model = mlflow.pyfunc.load_model(str(save_pyfunc(vector_model["dir"], tmp_path / "pyfunc")))
    frame = table(5, 5)
    want = Scorer(load_model(vector_model["dir"])).score(frame.to_numpy(np.float32))["score"]
    for given in (frame, frame.to_numpy(np.float32)):
        out = model.predict(given)
        np.testing.assert_allclose(out["score"], want, rtol=1e-5, atol=1e-5)
        assert (out["error"] == "").all()
    # named columns are picked by name, in any order and beside others
    out = model.predict(frame.iloc[:, ::-1].assign(id=range(len(frame))))
    np.testing.assert_allclose(out["score"], want, rtol=1e-5, atol=1e-5)
    bad = frame.to_numpy().copy()
    bad[1, 0] = np.inf
    out = model.predict(bad)
    assert out["label"][1] == -1 and out["error"][1] == "input[1]: NaN or infinite value"
    # one column of arrays, as Spark hands its ``pixels`` column over: a missing or short row costs only itself
    cells = list(frame.to_numpy(np.float64))
    out = model.predict(pd.DataFrame({"pixels": cells}))
    np.testing.assert_allclose(out["score"], want, rtol=1e-5, atol=1e-5)
    cells[2], cells[3] = None, cells[3][:2]
    out = model.predict(pd.DataFrame({"pixels": cells}))
    assert list(out["error"][2:4]) == [
        "input[2]: missing",
        "input[3]: 2 values in shape (2,), expected a list of 5 numbers",
    ]
    np.testing.assert_allclose(out["score"][[0, 1, 4]], want[[0, 1, 4]], rtol=1e-5, atol=1e-5)


def test_breast_cancer_holds_out_a_subsample_of_malignant_cases_as_in_odds_wbc():
    ds = load_vector_dataset("breast_cancer")
    assert ds.features.shape == (569, 30)
    split = vector_holdout_split(ds, 0, seed=3)
    assert split.test_is_anomaly.sum() == 21
    n_benign = int((ds.labels == 1).sum())
    assert len(split.train) + len(split.val) + int((split.test_is_anomaly == 0).sum()) == n_benign
    again = vector_holdout_split(ds, 0, seed=3)
    np.testing.assert_array_equal(split.test, again.test)  # a pure function of the seed
