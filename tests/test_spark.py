"""Spark batch scoring (`jebm-od score --engine spark`) on a real Spark local session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config
from PIL import Image

from outlier_jebm.batch import score_files
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import DataError
from outlier_jebm.pipeline import prepare_data, run_fit
from outlier_jebm.scoring import Scorer

pytest.importorskip("pyspark")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spark-model")
    cfg = tiny_config(epochs=1)
    data = prepare_data("digits", holdout=3, seed=0, val_fraction=cfg.train.val_fraction, image_size=8)
    run_fit(cfg, data, out_dir=root / "model", tracking_uri=f"sqlite:///{root / 'mlflow.db'}", remember=False)
    return root / "model"


@pytest.fixture(scope="module")
def images(digits01) -> np.ndarray:
    return digits01[0][:60]


def test_cli_spark_scores_pixels_like_local_scoring(tmp_path, model_dir, images):
    rows = [img.reshape(-1).tolist() for img in images]
    rows[3] = None  # missing
    rows[5] = rows[5][:10]  # wrong length
    rows[7] = [2.0] * 64  # out of range
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pd.DataFrame({"id": np.arange(len(rows)), "pixels": rows}).to_parquet(src)

    cmd = [
        sys.executable,
        "-m",
        "jebm_od.cli.main",
        "score",
        "--engine",
        "spark",
        str(src),
        str(dst),
        "--model",
        str(model_dir),
        "--spark-master",
        "local[2]",
        "--batch-rows",
        "16",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scored 57 of 60 rows" in done.stdout
    assert "id=3" in done.stdout and "missing" in done.stdout

    out = pd.read_parquet(dst).sort_values("id").reset_index(drop=True)
    scorer = Scorer(load_model(model_dir))
    assert list(out.columns[:2]) == ["id", "pixels"]
    assert {"score", "score_normalized", "label", "top_component", "error", "recon", "neg_log_prior"} <= set(
        out.columns
    )
    bad = out.loc[[3, 5, 7]]
    assert (bad["label"] == -1).all() and bad["score"].isna().all()
    assert "missing" in bad.loc[3, "error"] and "shape (10,)" in bad.loc[5, "error"] and "[0, 1]" in bad.loc[7, "error"]
    good = out[out["error"] == ""]
    assert len(good) == 57
    x = np.stack([np.asarray(p, dtype=np.float32).reshape(8, 8) for p in good["pixels"]])
    expected = scorer.score(x)
    np.testing.assert_allclose(good["score"].to_numpy(), expected["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(good["label"].to_numpy(), expected["label"])
    np.testing.assert_array_equal(good["top_component"].to_numpy(), expected["top_component"])

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in " ".join((again.stdout + again.stderr).split())


def test_spark_path_column_matches_cli_rows(tmp_path, model_dir, images):
    from outlier_jebm.spark import pyfunc_uri_for, score_parquet, spark_session

    paths = []
    for i, img in enumerate(images[:20]):
        p = tmp_path / f"d{i:02d}.png"
        Image.fromarray((img * 255).round().astype(np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths += [str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]
    src = tmp_path / "paths.parquet"
    pd.DataFrame({"path": paths}).to_parquet(src)
    pd.DataFrame({"x": [1.0]}).to_parquet(tmp_path / "neither.parquet")

    local = {r["path"]: r for r in score_files(Scorer(load_model(model_dir)), paths[:20])}
    spark = spark_session("local[2]")
    try:
        uri = pyfunc_uri_for(str(model_dir), tmp_path / "work")
        summary = score_parquet(spark, uri, str(src), str(tmp_path / "out.parquet"))
        with pytest.raises(DataError, match="needs a column 'pixels'"):
            score_parquet(spark, uri, str(tmp_path / "neither.parquet"), str(tmp_path / "o2.parquet"))
    finally:
        spark.stop()
    assert (summary.rows, summary.scored, summary.n_errors) == (22, 20, 2)
    out = pd.read_parquet(tmp_path / "out.parquet").set_index("path")
    for path in paths[:20]:
        assert out.loc[path, "error"] == ""
        assert out.loc[path, "score"] == pytest.approx(local[path]["score"], rel=1e-5, abs=1e-6)
        assert out.loc[path, "label"] == local[path]["label"]
    assert out.loc[paths[20], "label"] == -1 and "not an image" in out.loc[paths[20], "error"]
    assert out.loc[paths[21], "label"] == -1 and "No such file" in out.loc[paths[21], "error"]
    json.dumps(summary.top)  # the summary is plain data
