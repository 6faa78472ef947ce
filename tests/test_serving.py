"""Both servers as real processes on loopback: `jebm-od serve` and `mlflow models serve`."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import free_port as _free_port
from conftest import tiny_config
from PIL import Image

from outlier_jebm import native
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import DataError
from outlier_jebm.io.payload import item_from_json, items_from_array, items_from_frame
from outlier_jebm.pipeline import prepare_data, run_fit
from outlier_jebm.scoring import Scorer

REGISTERED = "tiny-digits"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model fitted on digits (3 held out), logged and registered in a tmp MLflow store."""
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(epochs=2)
    data = prepare_data("digits", holdout=3, seed=0, val_fraction=cfg.train.val_fraction, image_size=8)
    with contextlib.chdir(root):  # models/latest lands in the tmp dir
        summary = run_fit(cfg, data, out_dir=root / "model", tracking_uri=uri, register=REGISTERED)
    return {"root": root, "uri": uri, "dir": root / "model", "model_uri": summary.model_uri, "data": data}


def _start(cmd: list[str], port: int, env: dict | None = None, cwd: Path | None = None, timeout: float = 90.0):
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, text=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not come up in {timeout} s:\n{proc.stdout.read()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(fitted):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "jebm_od.cli.main",
        "serve",
        "--model",
        str(fitted["dir"]),
        "--port",
        str(port),
        "--max-items",
        "64",
        "--max-body-mb",
        "0.5",
        "--log-level",
        "warning",
    ]
    proc = _start(cmd, port, cwd=Path(__file__).resolve().parent.parent)
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def _expected(fitted, images):
    return Scorer(load_model(fitted["dir"])).score(images)


def _metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _png(image01: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image01 * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_scores_a_good_batch_like_the_library(server, fitted):
    images = fitted["data"].test[:20]
    r = httpx.post(f"{server}/v1/score", json={"instances": images.tolist()})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    want = _expected(fitted, images)
    assert len(preds) == 20
    np.testing.assert_allclose([p["score"] for p in preds], want["score"], rtol=1e-5, atol=1e-6)
    assert [p["label"] for p in preds] == want["label"].tolist()
    assert [p["top_component"] for p in preds] == list(want["top_component"])
    assert all(0.0 <= p["score_normalized"] <= 1.0 for p in preds)
    assert set(preds[0]["components"]) >= {"recon", "neg_log_prior", "latent_knn"}
    # integers 0-255, flat rows and the .npy fast path give the same scores
    ints = (images * 255).round().astype(int)
    r_int = httpx.post(f"{server}/v1/score", json={"instances": ints.reshape(20, -1).tolist()}).json()
    want_int = _expected(fitted, ints.astype(np.float32) / 255)
    np.testing.assert_allclose([p["score"] for p in r_int["predictions"]], want_int["score"], rtol=1e-5, atol=1e-6)
    buf = io.BytesIO()
    np.save(buf, images.astype(np.float32))
    r_npy = httpx.post(f"{server}/v1/score", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
    np.testing.assert_allclose([p["score"] for p in r_npy.json()["predictions"]], want["score"], rtol=1e-5, atol=1e-6)


def test_serve_bad_items_fail_alone(server, fitted):
    good = fitted["data"].test[:2]
    instances = [
        good[0].tolist(),
        [[0.5, 0.5]],
        {"b64": "not base64!"},
        {"b64": base64.b64encode(b"junk").decode()},
        (good[1] + 3).tolist(),
        "text",
        {"b64": base64.b64encode(_png(good[1])).decode()},
        [[None] * 8] * 8,
    ]
    r = httpx.post(f"{server}/v1/score", json={"instances": instances})
    assert r.status_code == 200, r.text
    body = r.json()
    preds = body["predictions"]
    assert len(preds) == len(instances) and body["n_scored"] == 2 and body["n_errors"] == 6
    assert "score" in preds[0] and "score" in preds[6]
    assert "shape" in preds[1]["error"] and "base64" in preds[2]["error"]
    assert "not an image" in preds[3]["error"] and "[0, 1]" in preds[4]["error"]
    assert "instances[5]" in preds[5]["error"] and "instances[7]" in preds[7]["error"]
    np.testing.assert_allclose(preds[0]["score"], _expected(fitted, good[:1])["score"][0], rtol=1e-5, atol=1e-6)


def test_serve_multipart_uploads_in_order(server, fitted):
    images = fitted["data"].test[:3]
    files = [("file", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
    files.insert(1, ("file", ("broken.png", _png(images[0])[:30], "image/png")))
    r = httpx.post(f"{server}/v1/score", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [("error" in p) for p in preds] == [False, True, False, False]
    assert "broken.png" in preds[1]["error"] and preds[1]["label"] == -1  # schema.UNSCORED_LABEL, as in every output
    from outlier_jebm.data import decode_image

    want = _expected(fitted, np.stack([decode_image(_png(im), 8) for im in images]))
    np.testing.assert_allclose([preds[i]["score"] for i in (0, 2, 3)], want["score"], rtol=1e-5, atol=1e-6)


def test_serve_rejects_bad_requests_and_keeps_serving(server, fitted):
    big = httpx.post(
        f"{server}/v1/score", content=b"[" + b"0," * 400_000 + b"0]", headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and "limit" in big.json()["error"]
    many = httpx.post(f"{server}/v1/score", json={"instances": [[0.0] * 64] * 65})
    assert many.status_code == 413 and "65 items" in many.json()["error"]
    for n in (65, 80):  # uploads too: one past the limit, and well past it (the multipart parser stops that one)
        files = [("file", (f"{i}.png", _png(np.zeros((8, 8))), "image/png")) for i in range(n)]
        many = httpx.post(f"{server}/v1/score", files=files)
        assert many.status_code == 413 and "over the limit of 64" in many.json()["error"], many.text
    wrong = httpx.post(f"{server}/v1/score", content=b"hello", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415 and "content type" in wrong.json()["error"]
    broken = httpx.post(f"{server}/v1/score", content=b"{nope", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]
    shape = httpx.post(f"{server}/v1/score", json={"items": []})
    assert shape.status_code == 422 and "instances" in shape.json()["error"]
    empty = httpx.post(f"{server}/v1/score", json={"instances": []})
    assert empty.status_code == 422
    npy = httpx.post(f"{server}/v1/score", content=b"\x93NUMPY garbage", headers={"content-type": "application/x-npy"})
    assert npy.status_code == 400
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    ok = httpx.post(f"{server}/v1/score", json={"instances": fitted["data"].test[:1].tolist()})
    assert ok.status_code == 200


def test_a_multipart_text_field_over_its_limit_is_413_and_the_app_keeps_serving(fitted):
    from starlette.testclient import TestClient

    from jebm_od.serving.app import Limits, create_app

    limits = Limits(max_text_field_bytes=1024)  # the default is 1 MB, under the default 32 MB body limit
    png = _png(np.zeros((8, 8)))
    with TestClient(create_app(load_model(fitted["dir"]), limits=limits)) as client:
        assert client.get("/v1/model").json()["limits"]["max_text_field_bytes"] == 1024
        big = client.post("/v1/score", data={"note": "x" * 1025}, files={"f": ("a.png", png, "image/png")})
        assert big.status_code == 413 and "not a file upload" in big.json()["error"], big.text
        assert "1024 bytes" in big.json()["error"]
        # a field within the limit is ignored, and the upload beside it scored
        ok = client.post("/v1/score", data={"note": "x" * 1024}, files={"f": ("a.png", png, "image/png")})
        assert ok.status_code == 200 and ok.json()["n_scored"] == 1, ok.text


def test_a_timed_out_batch_holds_its_queue_place_and_odd_requests_cost_nothing(fitted, monkeypatch):
    from starlette.testclient import TestClient

    import jebm_od.serving.app as serving_app
    from jebm_od.serving.app import Limits, create_app
    from outlier_jebm import native

    real = serving_app.score_items
    release = threading.Event()  # the first batch is scored only once the test has seen the queue full

    def slow(scorer, items):
        release.wait(30)
        return real(scorer, items)

    monkeypatch.setattr(serving_app, "score_items", slow)
    monkeypatch.setattr(native, "status", lambda: "torch search (the fused kernel did not build: /home/someone/x.c)")
    one = {"instances": fitted["data"].test[:1].tolist()}
    with TestClient(create_app(load_model(fitted["dir"]), limits=Limits(timeout_s=0.2, max_queue=1))) as client:
        first = client.post("/v1/score", json=one)
        assert first.status_code == 503 and "timeout" in first.json()["error"]
        # the first batch is still being scored: it keeps its place in the queue, and the next request is turned away
        second = client.post("/v1/score", json=one)
        assert second.status_code == 503 and "server busy" in second.json()["error"], second.text
        release.set()
        # the kNN search's build error names paths on the server: the answer does not
        assert "/home" not in client.get("/v1/model").text
        # a .npy header declaring more data than the body holds is refused before numpy allocates it
        header = (
            b"\x93NUMPY\x01\x00" + b"v\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000,), }"
        )
        huge = client.post("/v1/score", content=header.ljust(128, b" "), headers={"content-type": "application/x-npy"})
        assert huge.status_code == 400 and "declares" in huge.json()["error"]
        text = ("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "9" * 400 + ",), }").ljust(463) + "\n"
        header = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()  # past any float: no overflow
        huge = client.post("/v1/score", content=header, headers={"content-type": "application/x-npy"})
        assert huge.status_code == 400 and "declares" in huge.json()["error"], huge.text
        # request methods outside GET, POST and HEAD share one metrics label
        client.request("FOO1", "/v1/score")
        metrics = client.get("/metrics").text
        assert 'method="FOO1"' not in metrics and 'method="other"' in metrics


def test_serve_concurrent_clients_and_metrics(server, fitted):
    before = httpx.get(f"{server}/metrics").text
    images = fitted["data"].test[:32]
    want = _expected(fitted, images)["score"]

    def client(i: int) -> list[float]:
        with httpx.Client(base_url=server, timeout=30) as c:
            out = []
            for j in range(3):
                batch = images[(i + j) % 4 * 8 : (i + j) % 4 * 8 + 8]
                r = c.post("/v1/score", json={"instances": batch.tolist()})
                assert r.status_code == 200, r.text
                out.append(((i + j) % 4, [p["score"] for p in r.json()["predictions"]]))
            return out

    with ThreadPoolExecutor(8) as pool:
        results = [x for chunk in pool.map(client, range(8)) for x in chunk]
    for k, scores in results:
        np.testing.assert_allclose(scores, want[k * 8 : k * 8 + 8], rtol=1e-5, atol=1e-6)
    after = httpx.get(f"{server}/metrics").text
    ok = dict(name="jebm_requests_total", route="/v1/score", method="POST", status="200")
    assert _metric(after, **ok) - _metric(before, **ok) == 24
    assert (
        _metric(after, "jebm_items_total", outcome="scored") - _metric(before, "jebm_items_total", outcome="scored")
        == 192
    )
    assert _metric(after, "jebm_batch_size_count") - _metric(before, "jebm_batch_size_count") == 24
    assert _metric(after, "jebm_model_load_seconds") > 0
    assert "jebm_request_latency_seconds_bucket" in after and "jebm_requests_in_flight" in after
    info = httpx.get(f"{server}/v1/model").json()
    assert info["image_size"] == 8 and info["calibration"]["threshold"] == pytest.approx(
        load_model(fitted["dir"]).calibration["threshold"]
    )
    assert info["training"]["holdout"] == 3
    assert info["knn_search"] == native.status()  # the fused kernel where it builds, else why not
    # the server names its model; no answer reveals where the model lies on the server's disk
    assert info["model"] == fitted["dir"].name
    where = str(fitted["dir"].parent)
    for answer in (
        httpx.get(f"{server}/v1/model").text,
        httpx.get(f"{server}/health").text,
        httpx.post(f"{server}/v1/score", json={"instances": [fitted["data"].test[0].tolist()]}).text,
    ):
        assert where not in answer


def test_mlflow_models_serve_matches_the_cli(fitted, tmp_path):
    port = _free_port()
    env = {"MLFLOW_TRACKING_URI": fitted["uri"]}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{REGISTERED}/1",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    proc = _start(cmd, port, env=env, cwd=tmp_path, timeout=120)
    try:
        images = fitted["data"].test[:10]
        want = _expected(fitted, images)
        split = pd.DataFrame(images.reshape(10, -1)).to_dict(orient="split")
        split.pop("index")
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_split": split}, timeout=60)
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        np.testing.assert_allclose([row["score"] for row in rows], want["score"], rtol=1e-5, atol=1e-6)
        assert [row["label"] for row in rows] == want["label"].tolist()
        for payload in (images.tolist(), images.reshape(10, -1).tolist()):
            r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": payload}, timeout=60)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(
                [row["score"] for row in r.json()["predictions"]], want["score"], rtol=1e-5, atol=1e-6
            )
        bad = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": [[1, 2, 3]]}, timeout=60)
        assert bad.status_code == 400
    finally:
        _stop(proc)


def test_score_cli_takes_a_registered_model_uri(fitted, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from jebm_od.cli.main import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted["uri"])
    monkeypatch.setenv("COLUMNS", "200")
    images = fitted["data"].test[:4]
    for i, im in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(_png(im))
    res = CliRunner().invoke(
        app, ["score", str(tmp_path), "--model", f"models:/{REGISTERED}/1", "--out", str(tmp_path / "s.csv")]
    )
    assert res.exit_code == 0, res.output
    got = pd.read_csv(tmp_path / "s.csv").sort_values("path")
    res2 = CliRunner().invoke(
        app, ["score", str(tmp_path), "--model", str(fitted["dir"]), "--out", str(tmp_path / "d.csv")]
    )
    assert res2.exit_code == 0, res2.output
    np.testing.assert_allclose(got["score"], pd.read_csv(tmp_path / "d.csv").sort_values("path")["score"])
    missing = CliRunner().invoke(app, ["score", str(tmp_path), "--model", "models:/no-such-model/1"])
    assert missing.exit_code == 2 and "no-such-model" in missing.output


def test_pyfunc_loads_and_scores_every_input_form(fitted):
    import mlflow

    mlflow.set_tracking_uri(fitted["uri"])
    model = mlflow.pyfunc.load_model(fitted["model_uri"])
    images = fitted["data"].test[:5]
    want = _expected(fitted, images)["score"]
    flat = images.reshape(5, -1)
    for given in (flat, images, pd.DataFrame(flat), pd.DataFrame({"pixels": list(flat)})):
        out = model.predict(given)
        np.testing.assert_allclose(out["score"], want, rtol=1e-5, atol=1e-6)
        assert list(out.columns[:5]) == ["score", "score_normalized", "label", "top_component", "error"]
    bad = flat.copy()
    bad[2, 0] = np.nan
    out = model.predict(bad)
    assert out["label"][2] == -1 and "NaN" in out["error"][2] and out["error"][0] == ""
    np.testing.assert_allclose(out["score"][[0, 1, 3, 4]], want[[0, 1, 3, 4]], rtol=1e-5, atol=1e-6)


def test_a_pyfunc_loaded_with_path_reading_off_opens_no_file_and_scores_pixels_as_before(fitted, tmp_path, monkeypatch):
    import mlflow
    from PIL import Image

    from outlier_jebm.io.payload import PATHS_OFF

    mlflow.set_tracking_uri(fitted["uri"])
    images = fitted["data"].test[:2]
    png = tmp_path / "a.png"
    Image.fromarray((images[0] * 255).round().astype(np.uint8)).save(png)
    paths = pd.DataFrame({"path": [str(png), "/etc/passwd"]})
    on = mlflow.pyfunc.load_model(fitted["model_uri"]).predict(paths)
    assert on["error"][0] == "" and "not an image" in on["error"][1]  # on: the host's files are read
    monkeypatch.setenv("JEBM_OD_READ_PATHS", "0")
    off = mlflow.pyfunc.load_model(fitted["model_uri"])
    for frame in (paths, pd.DataFrame({"f": [str(png), "/etc/passwd"]})):  # named, and one unnamed column
        out = off.predict(frame)
        assert list(out["label"]) == [-1, -1] and list(out["error"]) == [f"input[{i}]: {PATHS_OFF}" for i in (0, 1)]
    np.testing.assert_allclose(
        off.predict(images.reshape(2, -1))["score"], _expected(fitted, images)["score"], rtol=1e-5, atol=1e-6
    )


def test_payload_parsing_per_item():
    s = 8
    assert item_from_json([[0.0] * s] * s, s, 0).pixels.shape == (s, s)
    assert item_from_json([255] * (s * s), s, 0).pixels.max() == pytest.approx(1.0)
    assert "ragged" in item_from_json([[0.0] * s, [0.0]], s, 3).error
    assert "instances[3]" in item_from_json([[0.0] * s, [0.0]], s, 3).error
    assert "b64" in item_from_json({"url": "x"}, s, 0).error
    items = items_from_array(np.array([[0.5] * 64, [2.0] * 64, [np.inf] * 64]), s)
    assert items[0].error is None and "[0, 1]" in items[1].error and "NaN or infinite" in items[2].error
    with pytest.raises(DataError, match="shape"):
        items_from_array(np.zeros((3, 10)), s)
    # one unnamed column of paths with a gap (NaN under pandas 3): still paths, the gap its own error
    errs = [it.error for it in items_from_frame(pd.DataFrame({"f": ["/no/such/a.png", None]}), s)]
    assert "cannot read" in errs[0] and "not a file path" in errs[1]
    frame = pd.DataFrame({"path": ["/no/such/file.png", 3]})
    errs = [it.error for it in items_from_frame(frame, s)]
    assert "cannot read" in errs[0] and "not a file path" in errs[1]
    with pytest.raises(DataError, match="numeric"):
        items_from_frame(pd.DataFrame({"a": [1.0], "b": ["x"]}), s)
    # 64 integer pixel columns (0-255): a missing cell, or one that is not a number, costs its own row only
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, s * s))
    frame = pd.DataFrame(pixels, columns=[f"p{j}" for j in range(s * s)]).astype(object)
    frame.iloc[1, 5], frame.iloc[2, 7] = None, "x"
    items = items_from_frame(frame, s)
    want = items_from_array(pixels, s)
    assert items[1].error == "input[1]: missing or not a number in column(s) p5"
    assert items[2].error == "input[2]: missing or not a number in column(s) p7"
    for i in (0, 3):
        assert items[i].error is None
        np.testing.assert_array_equal(items[i].pixels, want[i].pixels)
    # the same integers in object-typed columns without a gap are 0-255 too (they were refused as out of [0, 1])
    whole = items_from_frame(pd.DataFrame(pixels, columns=[f"p{j}" for j in range(s * s)]).astype(object), s)
    for got, expected in zip(whole, want):
        assert got.error is None
        np.testing.assert_array_equal(got.pixels, expected.pixels)
    # a lone string in a column named pixels is that row's problem, not a reason to read every row as a path
    cells = [np.full(s * s, 0.25), "x", np.full(s * s, 0.5)]
    errors = [it.error for it in items_from_frame(pd.DataFrame({"pixels": cells}), s)]
    assert errors[0] is None and errors[2] is None and errors[1].startswith("pixels[1]")


def test_pixels_cells_stay_aligned_one_item_per_row():
    s = 8
    good = np.full(s * s, 0.25)
    cells = [
        good,
        None,
        good[:10],
        np.full(s * s, 2.0),
        np.full((s, s), 255, dtype=np.uint8),
        np.stack([good, good]),
        good.tolist(),
        [[0.1, 0.2], [0.3]],
    ]
    items = items_from_frame(pd.DataFrame({"pixels": cells}), s)
    assert len(items) == len(cells)
    errors = [it.error for it in items]
    assert errors[0] is None and errors[4] is None and errors[6] is None
    assert items[4].pixels.max() == pytest.approx(1.0) and items[6].pixels.shape == (s, s)
    assert errors[1] == "pixels[1]: missing"
    assert errors[2].startswith("pixels[2]: shape (10,)")
    assert errors[3].startswith("pixels[3]") and "[0, 1]" in errors[3]
    assert errors[5].startswith("pixels[5]") and "one image per row" in errors[5]
    assert errors[7].startswith("pixels[7]")
