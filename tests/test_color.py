"""Colour images end to end (``model.channels: 3``): loaders, CLI, server, pyfunc, Spark.

The synthetic task: red discs on a textured background are normal, blue squares are
anomalies. A grayscale model keeps reading colour as luminance, as it always has.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import free_port, tiny_config
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_serving import _start, _stop
from typer.testing import CliRunner

from jebm_od.cli.main import app
from outlier_jebm.batch import score_files
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import DataError, decode_image, load_dataset, read_image, to_unit_range
from outlier_jebm.io.payload import items_from_array, items_from_frame
from outlier_jebm.pipeline import TrainingData, run_fit
from outlier_jebm.scoring import Scorer

S = 16
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def shapes(n: int, kind: str, seed: int) -> np.ndarray:
    """(n, S, S, 3) in [0, 1]: a red disc ("disc") or a blue square ("square") on a noisy, striped background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    out = np.empty((n, S, S, 3), dtype=np.float32)
    for i in range(n):
        img = (0.3 + 0.15 * rng.random(3)) + 0.06 * rng.standard_normal((S, S, 3))
        img += 0.06 * np.sin(xx * 0.9 + yy * 0.4 + rng.uniform(0, 2 * np.pi))[..., None]
        if kind == "disc":
            cx, cy, r = rng.uniform(5, 11), rng.uniform(5, 11), rng.uniform(3, 4.5)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (0.9, 0.15, 0.1)
        else:
            side = rng.integers(5, 8)
            x, y = rng.integers(2, S - side - 1, size=2)
            img[y : y + side, x : x + side] = (0.1, 0.2, 0.9)
        out[i] = np.clip(img, 0.0, 1.0)
    return out


def to_u8(images01: np.ndarray) -> np.ndarray:
    return (np.asarray(images01) * 255).round().astype(np.uint8)


def png(image01: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_u8(image01)).save(buf, format="PNG")
    return buf.getvalue()


def write_pngs(folder: Path, images01: np.ndarray, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}_{i:02d}.png" for i in range(len(images01))]
    for path, img in zip(paths, images01):
        path.write_bytes(png(img))
    return paths


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def color_model(tmp_path_factory) -> dict:
    """A tiny colour model (MLP backbone, 16 x 16 x 3) fitted through the CLI on a folder of red discs."""
    root = tmp_path_factory.mktemp("color")
    write_pngs(root / "train", shapes(200, "disc", seed=0), "disc")
    cfg = tiny_config(epochs=3, batch_size=32, sample_every=100).to_dict()
    cfg["model"].update(image_size=S, channels=3)
    (root / "color.yaml").write_text(yaml.safe_dump(cfg))
    with contextlib.chdir(root):  # models/latest lands in the tmp dir
        res = runner.invoke(
            app,
            [
                "fit",
                "--data",
                str(root / "train"),
                "--config",
                str(root / "color.yaml"),
                "--out",
                str(root / "model"),
                "--tracking-uri",
                f"sqlite:///{root / 'mlflow.db'}",
            ],
        )
    assert res.exit_code == 0, res.output
    return {
        "root": root,
        "dir": root / "model",
        "normal": shapes(30, "disc", seed=1),
        "anomalous": shapes(30, "square", seed=2),
    }


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory, digits01) -> Path:
    """A tiny grayscale model on sklearn's 8 x 8 digits, untracked."""
    root = tmp_path_factory.mktemp("gray")
    images = digits01[0][:400]
    data = TrainingData(train=images[:360], val=images[360:], name="digits", holdout=None)
    run_fit(tiny_config(epochs=1), data, out_dir=root / "model", track=False, remember=False)
    return root / "model"


def expected(model_dir: Path, images01: np.ndarray) -> dict:
    return Scorer(load_model(model_dir)).score(images01)


# Loaders


def test_folders_and_array_files_of_color_images_load_as_rgb(tmp_path):
    images = shapes(4, "disc", seed=3)
    write_pngs(tmp_path / "imgs", images, "disc")
    Image.fromarray(to_u8(shapes(1, "square", seed=4)[0])).resize((20, 20)).save(tmp_path / "imgs" / "big.png")
    ds = load_dataset(str(tmp_path / "imgs"), image_size=S, channels=3)
    assert ds.images.shape == (5, S, S, 3) and ds.images.dtype == np.float32 and ds.labels is None
    np.testing.assert_allclose(ds.images[1:], to_u8(images) / 255.0, atol=1e-6)  # big.png sorts first

    raw = to_u8(shapes(5, "square", seed=5))
    np.save(tmp_path / "u8.npy", raw)
    np.savez(tmp_path / "floats.npz", images=raw / 255.0, labels=np.arange(5))
    for name in ("u8.npy", "floats.npz"):
        ds = load_dataset(str(tmp_path / name), image_size=S, channels=3)
        assert ds.images.shape == (5, S, S, 3)
        np.testing.assert_allclose(ds.images, raw / 255.0, atol=1e-6)
    np.testing.assert_array_equal(
        load_dataset(str(tmp_path / "floats.npz"), image_size=S, channels=3).labels, np.arange(5)
    )
    assert load_dataset(str(tmp_path / "u8.npy"), image_size=8, channels=3).images.shape == (5, 8, 8, 3)

    # colour -> gray for a grayscale model: the luminance, never inverted for arrays
    gray = load_dataset(str(tmp_path / "u8.npy"), image_size=S)
    assert gray.images.shape == (5, S, S)
    np.testing.assert_allclose(gray.images, (raw / 255.0) @ LUMA, atol=1e-5)
    assert load_dataset(str(tmp_path / "imgs"), image_size=S).images.shape == (5, S, S)
    # gray -> colour for a colour model: the channel repeated
    np.save(tmp_path / "gray.npy", raw[..., 0])
    rgb = load_dataset(str(tmp_path / "gray.npy"), image_size=S, channels=3).images
    np.testing.assert_allclose(rgb, np.repeat(raw[..., :1] / 255.0, 3, axis=-1), atol=1e-6)
    assert load_dataset("digits", channels=3, image_size=8).images.shape == (1797, 8, 8, 3)

    np.save(tmp_path / "odd.npy", raw[:, :, :15])
    with pytest.raises(DataError, match=r"odd.npy: images must have shape .*\(N, H, H, 3\)"):
        load_dataset(str(tmp_path / "odd.npy"), image_size=S, channels=3)


def test_a_color_image_is_never_inverted_and_a_gray_one_repeats_its_channel(tmp_path):
    paper = np.ones((S, S, 3), dtype=np.float32)  # a red disc on white paper
    paper[4:12, 4:12] = (0.9, 0.1, 0.1)
    path = tmp_path / "paper.png"
    path.write_bytes(png(paper))
    rgb = read_image(path, S, channels=3)
    assert rgb.shape == (S, S, 3)
    np.testing.assert_allclose(rgb, to_u8(paper) / 255.0, atol=1e-6)
    gray = read_image(path, S, polarity="auto")  # grayscale: luminance, inverted to MNIST polarity
    assert gray.shape == (S, S) and gray[0, 0] < 0.01 and gray[8, 8] > 0.5
    assert np.array_equal(read_image(path, S, channels=3, polarity="auto"), rgb)  # colour: never inverted

    digit = np.zeros((S, S), dtype=np.uint8)
    digit[3:13, 7:9] = 255
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG")
    np.testing.assert_array_equal(
        decode_image(buf.getvalue(), S, channels=3), np.repeat(decode_image(buf.getvalue(), S)[..., None], 3, axis=-1)
    )
    rgba = np.zeros((S, S, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red goes over black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    over_black = (200 / 255 * 128 / 255, 0.0, 0.0)
    np.testing.assert_allclose(decode_image(buf.getvalue(), S, channels=3)[0, 0], over_black, atol=1e-6)


def test_user_arrays_convert_between_gray_and_color_and_name_the_input_when_wrong():
    color = shapes(2, "disc", seed=6)
    assert to_unit_range(color, S, channels=3).shape == (2, S, S, 3)
    assert to_unit_range(to_u8(color).reshape(2, -1), S, channels=3).max() == pytest.approx(color.max(), abs=1 / 255)
    np.testing.assert_allclose(to_unit_range(color, S), color @ LUMA, atol=1e-6)
    np.testing.assert_array_equal(to_unit_range(color[..., 0], S, channels=3), np.repeat(color[..., :1], 3, axis=-1))
    with pytest.raises(DataError, match=r"payload: shape \(2, 16, 16, 4\) is not one of .*\(N, 16, 16, 3\)"):
        to_unit_range(np.zeros((2, S, S, 4)), S, name="payload", channels=3)

    items = items_from_frame(
        pd.DataFrame({"pixels": [color[0].reshape(-1), color[1][:, :, :2].reshape(-1), color[1][..., 0]]}),
        S,
        channels=3,
    )
    assert items[0].error is None and items[0].pixels.shape == (S, S, 3)
    assert items[1].error.startswith("pixels[1]: shape (512,)") and "(768,)" in items[1].error
    assert items[2].error is None and items[2].pixels.shape == (S, S, 3)  # a gray cell, repeated
    with pytest.raises(DataError, match=r"array: shape \(2, 16, 16, 2\)"):
        items_from_array(np.zeros((2, S, S, 2)), S, "array", channels=3)


# The CLI


def test_cli_fits_a_color_model_whose_blue_squares_score_above_red_discs(color_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    folder = tmp_path / "inputs"
    write_pngs(folder, color_model["normal"], "normal")
    write_pngs(folder, color_model["anomalous"], "anomaly")
    (folder / "broken.png").write_bytes(b"nope")
    res = runner.invoke(
        app, ["score", str(folder), "--model", str(color_model["dir"]), "--out", "res.csv", "--maps", "maps"]
    )
    assert res.exit_code == 0, res.output
    rows = pd.read_csv("res.csv", keep_default_na=False)
    assert len(rows) == 61 and (rows["error"] != "").sum() == 1
    scored = rows[rows["error"] == ""]
    is_anomaly = scored["path"].str.contains("anomaly").to_numpy()
    assert roc_auc_score(is_anomaly, scored["score"].astype(float)) > 0.8
    # the same scores as the library on the same decoded images
    first = sorted(folder.glob("anomaly_*.png"))[:3]
    want = expected(color_model["dir"], np.stack([read_image(p, S, channels=3) for p in first]))
    close(scored.set_index("path").loc[[str(p) for p in first], "score"], want["score"])

    # anomaly maps: the colour input on the left, a heat overlay on a gray copy on the right
    overlay = Image.open(next(Path("maps").glob("*-anomaly_00_png.png")))
    assert overlay.mode == "RGB" and overlay.size == ((2 * S + 1) * 6, S * 6)
    left = np.asarray(overlay)[::6, ::6][:, :S]
    np.testing.assert_array_equal(left, to_u8(read_image(folder / "anomaly_00.png", S, channels=3)))

    res = runner.invoke(app, ["sample", "--model", str(color_model["dir"]), "--kind", "chains", "--out", "s.png"])
    assert res.exit_code == 0, res.output
    assert Image.open("s.png").mode == "RGB"


# The HTTP server, the MLflow pyfunc, Spark


def test_serve_takes_color_arrays_images_and_gray_arrays(color_model):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jebm_od.cli.main",
        "serve",
        "--model",
        str(color_model["dir"]),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = _start(cmd, port, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        images = np.concatenate([color_model["normal"][:3], color_model["anomalous"][:3]])
        want = expected(color_model["dir"], images)["score"]
        r = httpx.post(f"{url}/v1/score", json={"instances": images.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        close([p["score"] for p in r.json()["predictions"]], want)

        buf = io.BytesIO()
        np.save(buf, to_u8(images))
        r = httpx.post(
            f"{url}/v1/score", content=buf.getvalue(), headers={"content-type": "application/x-npy"}, timeout=30
        )
        want_u8 = expected(color_model["dir"], to_u8(images) / 255.0)["score"]
        close([p["score"] for p in r.json()["predictions"]], want_u8)

        decoded = np.stack([decode_image(png(im), S, channels=3) for im in images[:2]])
        want_png = expected(color_model["dir"], decoded)["score"]
        uploads = [("file", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images[:2])]
        r = httpx.post(f"{url}/v1/score", files=uploads, timeout=30)
        close([p["score"] for p in r.json()["predictions"]], want_png)

        gray = images[0] @ LUMA
        instances = [
            {"b64": base64.b64encode(png(images[0])).decode()},
            gray.tolist(),
            np.zeros((S, S, 4)).tolist(),
            images[1].reshape(-1).tolist(),
        ]
        r = httpx.post(f"{url}/v1/score", json={"instances": instances}, timeout=30)
        preds = r.json()["predictions"]
        close(preds[0]["score"], want_png[0])
        close(preds[1]["score"], expected(color_model["dir"], np.repeat(gray[None, ..., None], 3, axis=-1))["score"][0])
        assert preds[2]["error"].startswith("instances[2]: shape (16, 16, 4)")
        close(preds[3]["score"], want[1])
        assert httpx.get(f"{url}/v1/model").json()["channels"] == 3
    finally:
        _stop(proc)


def test_pyfunc_takes_color_tensors_pixel_columns_and_paths(color_model, tmp_path):
    import mlflow
    from mlflow.models import Model

    from outlier_jebm.registry import save_pyfunc

    path = save_pyfunc(color_model["dir"], tmp_path / "pyfunc")
    example = Model.load(str(path)).load_input_example(str(path))
    assert np.asarray(example).shape == (2, S * S * 3)
    model = mlflow.pyfunc.load_model(str(path))
    images = np.concatenate([color_model["normal"][:3], color_model["anomalous"][:2]])
    want = expected(color_model["dir"], images)["score"]
    flat = images.reshape(5, -1)  # H, W, C order
    for given in (images, flat, pd.DataFrame(flat), pd.DataFrame({"pixels": list(flat)})):
        out = model.predict(given)
        close(out["score"], want)
        assert (out["error"] == "").all()
    files = write_pngs(tmp_path / "files", images, "img")
    out = model.predict(pd.DataFrame({"path": [str(p) for p in files]}))
    close(out["score"], expected(color_model["dir"], np.stack([read_image(p, S, channels=3) for p in files]))["score"])
    out = model.predict(pd.DataFrame({"pixels": [flat[0], flat[1][: S * S * 2]]}))
    assert out["error"][0] == "" and out["label"][1] == -1 and out["error"][1].startswith("pixels[1]: shape (512,)")


def test_spark_scores_a_pixels_column_of_color_images(color_model, tmp_path):
    pytest.importorskip("pyspark")
    from outlier_jebm.spark import pyfunc_uri_for, score_parquet, spark_session

    images = np.concatenate([color_model["normal"][:4], color_model["anomalous"][:4]])
    rows = [row.tolist() for row in to_u8(images).reshape(len(images), -1)]
    gray = to_u8(images[2] @ LUMA)
    rows[2] = gray.reshape(-1).tolist()  # a gray image is fine (its channel repeated); a wrong length is not
    rows[5] = rows[5][:100]
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": np.arange(len(rows)), "pixels": rows}).to_parquet(src)
    spark = spark_session("local[1]")
    try:
        uri = pyfunc_uri_for(str(color_model["dir"]), tmp_path / "work")
        summary = score_parquet(spark, uri, str(src), str(tmp_path / "out.parquet"))
    finally:
        spark.stop()
    assert (summary.rows, summary.scored) == (8, 7)
    out = pd.read_parquet(tmp_path / "out.parquet").sort_values("id").reset_index(drop=True)
    assert out.loc[5, "label"] == -1 and out.loc[5, "error"].startswith("pixels[") and "(100,)" in out.loc[5, "error"]
    unit = to_u8(images) / 255.0
    unit[2] = np.repeat(gray[..., None] / 255.0, 3, axis=-1)
    keep = [i for i in range(8) if i != 5]
    close(out.loc[keep, "score"], expected(color_model["dir"], unit[keep].astype(np.float32))["score"])
    json.dumps(summary.top)


# A grayscale model given colour


def test_a_gray_model_scores_color_files_and_arrays_as_their_luminance(gray_model, tmp_path, digits01):
    tinted = digits01[0][:4, ..., None] * np.array([1.0, 0.6, 0.2], dtype=np.float32)  # (4, 8, 8, 3)
    files = [tmp_path / f"{i}.png" for i in range(4)]
    for path, img in zip(files, tinted):
        Image.fromarray(to_u8(img)).save(path)
    scorer = Scorer(load_model(gray_model))
    rows = list(score_files(scorer, files))
    assert all(r["error"] == "" for r in rows)
    close([r["score"] for r in rows], scorer.score(np.stack([read_image(p, 8) for p in files]))["score"])
    items = items_from_array(tinted, 8)
    assert items[0].pixels.shape == (8, 8)
    close(scorer.score(np.stack([it.pixels for it in items]))["score"], scorer.score(tinted @ LUMA)["score"])
