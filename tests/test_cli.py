import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from jebm_od.cli.main import app

runner = CliRunner()


def _write_config(path, **train):
    import yaml

    cfg = tiny_config(**{"epochs": 3, **train}).to_dict()
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(tmp_path, *options: str, db: str = "db.sqlite", **train):
    """``jebm-od fit --data digits`` with the tiny config (``train`` overrides) into ``m``, tracked in ``db``;
    asserts it succeeded."""
    cfg = _write_config(tmp_path / "tiny.yaml", **train)
    args = [
        "fit",
        "--data",
        "digits",
        "--config",
        str(cfg),
        "--out",
        "m",
        "--tracking-uri",
        f"sqlite:///{tmp_path / db}",
    ]
    res = runner.invoke(app, [*args, *options])
    assert res.exit_code == 0, res.output
    # MLflow's progress bar (fit downloads the logged model to validate it) and INFO lines stay out of ours
    assert "Downloading artifacts" not in res.output and "INFO mlflow" not in res.output
    return res


def test_fit_score_evaluate_sample_on_digits_end_to_end(tmp_path, monkeypatch, digits01):
    monkeypatch.chdir(tmp_path)
    # a narrow terminal, as in a log file: every message below must still come out on one line of its own
    monkeypatch.setenv("COLUMNS", "60")
    lines = lambda res: res.output.splitlines()  # noqa: E731
    db = tmp_path / "mlflow.db"
    res = _fit(tmp_path, "--holdout", "3", db="mlflow.db")
    assert any(ln.startswith("MLflow run: ") and ln.endswith(str(db)) for ln in lines(res))
    for name in ["config.json", "weights.safetensors", "calibration.json"]:
        assert (tmp_path / "m" / name).is_file()
    with sqlite3.connect(db) as con:
        keys = {k for (k,) in con.execute("select distinct key from metrics")}
    assert {"loss", "recon", "f_gap", "images_per_second", "seconds_per_epoch", "val_neg_elbo"} <= keys
    # sample quality at the end of the fit: the digits have labels, so the in-project LeNet is trained
    assert {"sample_fid_lenet", "sample_lenet_confidence", "sample_lenet_accuracy"} <= keys
    # ... and printed on the console, the same figure as logged
    with sqlite3.connect(db) as con:
        ((fid,),) = con.execute("select value from metrics where key = 'sample_fid_lenet'").fetchall()
    fid_line = f"FID (in-project LeNet features, not Inception FID): {fid:.3f} ("
    assert any(ln.startswith(fid_line) and ln.endswith("prior Langevin steps)") for ln in lines(res))
    assert any(ln.startswith("LeNet mean confidence: samples") and ln.endswith(")") for ln in lines(res))

    images, labels = digits01
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((images[i] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_text("nope")
    # no --model: the last fitted model is used
    out = tmp_path / ("a-rather-long-folder-name-" * 3 + "[bold]") / "res.json"  # markup-like, and wider than 60
    out.parent.mkdir()
    res = runner.invoke(app, ["score", str(folder), "--out", str(out), "--maps", "maps"])
    assert res.exit_code == 0, res.output
    assert f"results: {out}" in lines(res) and "anomaly maps: maps/" in lines(res)
    rows = json.loads(out.read_text())
    assert len(rows) == 5 and sum(r["error"] != "" for r in rows) == 1
    # an unscored row reads as everywhere else (outlier_jebm/schema.py): label -1, no score, no top component
    (bad,) = [r for r in rows if r["error"]]
    assert bad["label"] == -1 and bad["score"] is None and bad["top_component"] == "" and bad["recon"] is None
    # one map per scored image, named by its row in the output and its file name
    maps = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert len(maps) == 4
    for name in maps:
        row = rows[int(name[:6])]
        assert row["error"] == "" and name == f"{name[:6]}-{Path(row['path']).name.replace('.', '_')}.png"
    assert "broken.png" in res.output

    # the data and the split default to the model's own (digits here, not MNIST)
    res = runner.invoke(app, ["evaluate", "--json", "--tracking-uri", f"sqlite:///{db}"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"auprc", "auroc", "f1", "false_alarm_rate", "n_test", "holdout"} <= set(m) and m["holdout"] == 3

    # options are checked before any model loads (this one does not exist)
    for bad, said in (
        (["--kind", "posterior"], "--kind must be prior, hierarchical or chains"),
        (["--n", "0"], "--n must be at least 1"),
        (["--out", "grid.jpeg2"], "the grid is an image"),
        (["--out", str(tmp_path)], "is a folder"),
    ):
        res = runner.invoke(app, ["sample", "--model", "no-such-model", *bad])
        assert res.exit_code == 2 and said in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["sample", "--out", "s.png", "--kind", "hierarchical"])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "s.png").size[0] > 0

    res = runner.invoke(app, ["sample", "--out", str(out.parent / "s2.png"), "--metrics", "--metrics-n", "200"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out.parent / 's2.png'}" in lines(res)
    assert any(ln.startswith("FID (in-project LeNet features") and ln.endswith("steps)") for ln in lines(res))
    assert any(ln.startswith("LeNet mean confidence: samples") and ln.endswith(")") for ln in lines(res))


def test_sample_metrics_repeat_the_fit_figure_with_the_models_sample_steps_and_seed(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(epochs=1, sample_steps=25, seed=3).to_dict()
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res = runner.invoke(app, ["fit", "--data", "digits", "--config", "s.yaml", "--out", "m", "--tracking-uri", db])
    assert res.exit_code == 0, res.output
    with sqlite3.connect(tmp_path / "db.sqlite") as con:
        ((fid,),) = con.execute("select value from metrics where key = 'sample_fid_lenet'").fetchall()
    # no --steps, no --seed: the model's train.sample_steps (25, not its training value 10) and train.seed
    res = runner.invoke(app, ["sample", "--model", "m", "--out", "a.png", "--metrics"])
    assert res.exit_code == 0, res.output
    assert f"FID (in-project LeNet features, not Inception FID): {fid:.3f}" in res.output
    assert "(300 samples, 25 prior Langevin steps)" in " ".join(res.output.split())
    with sqlite3.connect(tmp_path / "db.sqlite") as con:
        ((logged,),) = con.execute("select value from metrics where key = 'sample_steps'").fetchall()
    assert logged == 25  # the fit logs the chain length behind its figure
    for other in (["--steps", "10"], ["--seed", "0"]):
        res = runner.invoke(app, ["sample", "--model", "m", "--out", "b.png", "--metrics", *other])
        assert res.exit_code == 0, res.output
        assert f"Inception FID): {fid:.3f}" not in res.output


def test_score_exits_non_zero_when_nothing_could_be_scored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, "--epochs", "1", "--max-train", "300")
    (tmp_path / "bad.png").write_bytes(b"")
    res = runner.invoke(app, ["score", str(tmp_path / "bad.png"), "--model", "m"])
    assert res.exit_code == 1
    assert "empty" in res.output
    (tmp_path / "nothing-here").mkdir()  # an empty folder is named, with the reason, not scored silently as nothing
    res = runner.invoke(app, ["score", str(tmp_path / "nothing-here"), "--model", "m"])
    assert res.exit_code == 1 and "nothing-here" in res.output and "no image files" in res.output
    # an unusable --device is refused before any data is loaded
    for command in (["evaluate", "--model", "m"], ["fit", "--data", "digits"]):
        res = runner.invoke(app, [*command, "--device", "tpu"])
        assert res.exit_code == 2 and "unknown device 'tpu'" in res.output, res.output
    # evaluate does not guess where data recorded by a file name alone is (here: a copy claiming a folder 'photos')
    import shutil

    shutil.copytree(tmp_path / "m", tmp_path / "m2")
    record = json.loads((tmp_path / "m2" / "config.json").read_text())
    record["meta"]["data"] = "photos"
    (tmp_path / "m2" / "config.json").write_text(json.dumps(record))
    res = runner.invoke(app, ["evaluate", "--model", "m2"])
    assert res.exit_code == 2 and "by the name 'photos' alone: pass --data" in " ".join(res.output.split())

    # recalibrating with another reference size rewrites the reference and records the setting
    from safetensors.torch import load_file

    res = runner.invoke(app, ["calibrate", "--model", "m", "--reference-size", "100"])
    assert res.exit_code == 0, res.output
    assert load_file(str(tmp_path / "m" / "reference_latents.safetensors"))["eps"].shape[0] == 100
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["score"]["reference_size"] == 100
    # "every training image" means the 300 the model was fitted on (fit --max-train), not the whole split
    assert runner.invoke(app, ["calibrate", "--model", "m", "--reference-size", "0"]).exit_code == 0
    assert load_file(str(tmp_path / "m" / "reference_latents.safetensors"))["eps"].shape[0] == 300

    # recalibrating at K = 2 writes K into the config and fits the scales at K = 2; scoring at another K says so
    config_of = lambda: json.loads((tmp_path / "m" / "config.json").read_text())["config"]["score"]  # noqa: E731
    res = runner.invoke(app, ["calibrate", "--model", "m", "--steps", "-1"])
    assert res.exit_code == 2 and "score.steps must be >= 0, got -1" in res.output
    assert config_of()["steps"] == 0  # nothing written
    reference_at_0 = load_file(str(tmp_path / "m" / "reference_latents.safetensors"))["eps"]
    res = runner.invoke(app, ["calibrate", "--model", "m", "--steps", "2", "--chains", "2"])
    assert res.exit_code == 0, res.output
    assert "at K = 2" in res.output
    assert {k: config_of()[k] for k in ("steps", "chains", "noise")} == {"steps": 2, "chains": 2, "noise": False}
    assert json.loads((tmp_path / "m" / "calibration.json").read_text())["score_steps"] == 2
    # the reference latents are the training images' codes after 2 posterior steps now
    assert not torch.equal(load_file(str(tmp_path / "m" / "reference_latents.safetensors"))["eps"], reference_at_0)
    assert runner.invoke(app, ["calibrate", "--model", "m", "--noise"]).exit_code == 0
    assert {k: config_of()[k] for k in ("steps", "chains", "noise")} == {"steps": 2, "chains": 2, "noise": True}
    # test-time shifts are turned on (and validated) the same way; the reference stays one code per training image
    res = runner.invoke(app, ["calibrate", "--model", "m", "--shifts", "4"])  # 8-pixel digits: half their size
    assert res.exit_code == 2 and "score.shifts must be under half the image's size" in res.output
    assert (
        runner.invoke(app, ["calibrate", "--model", "m", "--shifts", "1"]).exit_code == 0 and config_of()["shifts"] == 1
    )
    assert load_file(str(tmp_path / "m" / "reference_latents.safetensors"))["eps"].shape[0] == 300
    # a config and a calibration that disagree on shifts (an interrupted calibrate) are named when scoring
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    record["config"]["score"]["shifts"] = 0
    (tmp_path / "m" / "config.json").write_text(json.dumps(record))
    digit = tmp_path / "d.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
    said = " ".join(runner.invoke(app, ["score", str(digit), "--model", "m"]).output.split())
    assert "fitted with score.shifts 1, the model's config says 0" in said
    assert runner.invoke(app, ["calibrate", "--model", "m", "--shifts", "0"]).exit_code == 0
    assert "score.shifts" not in runner.invoke(app, ["score", str(digit), "--model", "m"]).output
    # a registered model is not recalibrated behind the user's back (it would change a downloaded copy)
    res = runner.invoke(app, ["calibrate", "--model", "models:/some-model/1", "--steps", "2"])
    assert res.exit_code == 2 and "calibrate writes into a model directory" in res.output
    digit = tmp_path / "d.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
    assert "calibration was fitted" not in runner.invoke(app, ["score", str(digit), "--model", "m"]).output
    res = runner.invoke(app, ["score", str(digit), "--model", "m", "--steps", "0"])
    assert res.exit_code == 0, res.output
    assert "the calibration was fitted at K = 2" in res.output and "calibrate --steps 0" in res.output


@pytest.mark.parametrize("columns", ["40", "80", "200"])
def test_a_missing_data_path_or_model_gives_a_clear_error_on_one_line(tmp_path, monkeypatch, columns):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", columns)
    # a long path with rich-markup-like brackets: it must come out whole, on the error's own line
    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "[bold]nowhere"
    res = runner.invoke(app, ["fit", "--data", str(missing), "--epochs", "1"])
    assert res.exit_code == 2
    line = next(ln for ln in res.output.splitlines() if ln.startswith("error:"))
    assert f"{missing} does not exist" in line
    res = runner.invoke(app, ["score", str(tmp_path)])
    assert res.exit_code == 2 and "jebm-od fit" in res.output


def test_fit_resume_trains_on_to_the_epochs_asked_for_on_the_saved_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, "--epochs", "1", val_fraction=0.3)
    meta_of = lambda: json.loads((tmp_path / "m" / "config.json").read_text())["meta"]  # noqa: E731
    first = meta_of()
    # resumed with another config (the default validation share) and another seed: the saved split is kept
    said = _fit(tmp_path, "--epochs", "2", "--resume", "--seed", "5").output
    assert "--resume keeps the saved model's split: --seed 5 ignored" in " ".join(said.split())
    after = meta_of()
    assert after["epochs_done"] == 2
    assert (after["n_train"], after["n_val"]) == (first["n_train"], first["n_val"])
    # and its config: --set is refused rather than ignored
    res = runner.invoke(app, ["fit", "--data", "digits", "--out", "m", "--resume", "--set", "prior=gaussian"])
    assert res.exit_code == 2 and "--set cannot change it" in " ".join(res.output.split())


def test_fit_and_evaluate_without_tracking_write_no_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _write_config(tmp_path / "tiny.yaml")
    base = ["fit", "--data", "digits", "--holdout", "3", "--config", str(cfg), "--out", "m", "--epochs", "1"]
    res = runner.invoke(app, [*base, "--max-train", "300", "--no-track"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "calibration.json").is_file() and "MLflow" not in res.output
    res = runner.invoke(app, ["evaluate", "--model", "m", "--no-track", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["mlflow_run_id"] is None
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    res = runner.invoke(app, [*base, "--no-track", "--register", "x"])
    assert res.exit_code == 2 and "cannot go with --no-track" in " ".join(res.output.split())


def test_fit_set_overrides_config_fields_and_names_a_bad_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, "--epochs", "1", "--max-train", "200", "--set", "prior=gaussian", "--set", "model.z_dims=[6, 3]")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["config"]
    assert saved["model"]["prior"] == "gaussian" and saved["model"]["z_dims"] == [6, 3]
    assert saved["train"]["epochs"] == 1  # --epochs still applies beside --set
    for bad, said in (("model.nope=1", "unknown config field 'model.nope'"), ("prior", "is not key=value")):
        res = runner.invoke(app, ["fit", "--data", "digits", "--out", "m2", "--set", bad])
        assert res.exit_code == 2 and said in " ".join(res.output.split()), res.output
        assert not (tmp_path / "m2").exists()


def test_fit_reports_a_stop_by_the_breakdown_guard_and_mlflow_records_it(tmp_path, monkeypatch):
    from outlier_jebm.train import BestEpoch

    real = BestEpoch.check
    message = "held-in -ELBO rose (a test); stopped, keeping epoch 1's weights"

    def check(self, epoch, value, *args):  # the real guard records epoch 1 as the best, then epoch 2 "breaks down"
        return message if epoch == 1 else real(self, epoch, value, *args)

    monkeypatch.setattr(BestEpoch, "check", check)
    monkeypatch.chdir(tmp_path)
    res = _fit(tmp_path, max_recon_rise=0.02)  # the tiny config asks for 3 epochs
    said = " ".join(res.output.split())
    assert f"breakdown guard: {message}" in said and "the model is epoch 1's" in said
    meta = json.loads((tmp_path / "m" / "config.json").read_text())["meta"]
    assert meta["epochs_done"] == 1 and meta["stopped_early"] == message
    with sqlite3.connect(tmp_path / "db.sqlite") as con:
        assert con.execute("select value from tags where key = 'stopped_early'").fetchall() == [(message,)]
        assert con.execute("select value from metrics where key = 'kept_epoch'").fetchall() == [(1.0,)]
        assert con.execute("select max(step) from metrics where key = 'val_recon'").fetchall() == [(2,)]


@pytest.mark.parametrize("scheme", ["variational", "mle"])
def test_fit_epoch_lines_show_the_guards_figure_and_flag_the_elbo_under_mle(tmp_path, monkeypatch, scheme):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "60")  # narrower than the epoch line: it must still come out as one line
    said = _fit(tmp_path, "--epochs", "1", "--max-train", "300", scheme=scheme).output
    assert any(ln.startswith("training on ") and ln.endswith("model -> m") for ln in said.splitlines())
    epoch_line = next(ln for ln in said.splitlines() if ln.startswith("epoch 1:"))
    assert epoch_line.rstrip().endswith(" s") and "img/s" in epoch_line
    done_line = next(ln for ln in said.splitlines() if ln.startswith("done in"))
    assert done_line.rstrip().endswith(")") and "val recon" in done_line
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["config"]["train"]["scheme"] == scheme
    val_recon = float(epoch_line.split("val recon ")[1].split()[0])
    assert np.isfinite(val_recon) and val_recon > 0
    flagged = "val -ELBO* " in epoch_line
    assert flagged == (scheme == "mle")
    footnote = "not comparable between epochs; val recon (the breakdown guard's figure) is comparable"
    assert (footnote in " ".join(said.split())) == (scheme == "mle")
    # --resume trains the saved model's scheme, whatever --config says (here the tiny config, variational)
    said = _fit(tmp_path, "--epochs", "2", "--resume", "--max-train", "300").output
    epoch_line = next(ln for ln in said.splitlines() if ln.startswith("epoch 2:"))
    assert ("val -ELBO* " in epoch_line) == (scheme == "mle")


@pytest.mark.parametrize("columns", ["60", "80", "200"])
def test_score_shows_paths_from_the_input_folder_and_counts_skipped_files(tmp_path, monkeypatch, digits01, columns):
    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.scoring import Scorer

    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, "--epochs", "1", "--max-train", "300")
    folder = tmp_path / ("a-long-parent-folder-name-" * 3) / "images_eval"
    images, _ = digits01
    for i, sub in enumerate(["first", "second", "third"]):
        (folder / sub).mkdir(parents=True)
        Image.fromarray((images[i] * 255).astype(np.uint8)).save(folder / sub / f"digit{i}.png")
    (folder / "notes.txt").write_text("not an image")
    monkeypatch.setenv("COLUMNS", columns)
    res = runner.invoke(app, ["score", str(folder), "--model", "m"])
    assert res.exit_code == 0, res.output
    assert "1 other files in the folders skipped" in res.output and "notes.txt" not in res.output
    components = Scorer(load_model(tmp_path / "m")).component_names
    for i, sub in enumerate(["first", "second", "third"]):  # each row tells its file apart, whole when it fits
        row = next(ln for ln in res.output.splitlines() if f"digit{i}.png" in ln)
        assert f"images_eval/{sub}/digit{i}.png" in row or columns == "60"
        assert any(f" {name} " in row for name in components), row  # the top component's name, never cut
    assert str(folder.parent) not in res.output
    res = runner.invoke(app, ["score", str(folder), "--model", "m", "--verbose"])
    assert f"skipped (not an image): {folder / 'notes.txt'}" in res.output
    res = runner.invoke(app, ["score", str(folder), "--model", "m", "--steps", "-3"])
    assert res.exit_code == 2 and "score.steps must be >= 0, got -3" in res.output
    # `--model models/latest` (the pointer file fit writes) names the same model as `--model m`
    for name, model in (("a.json", "m"), ("b.json", "models/latest")):
        res = runner.invoke(app, ["score", str(folder), "--model", model, "--out", name])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    (tmp_path / "models" / "latest").write_text(str(tmp_path / "gone") + "\n")
    res = runner.invoke(app, ["score", str(folder), "--model", "models/latest"])
    assert res.exit_code == 2 and "the model directory it names no longer exists" in res.output


def test_polarity_keep_scores_dark_on_light_as_it_is_and_auto_inverts_it_everywhere(tmp_path, monkeypatch, digits01):
    from starlette.testclient import TestClient

    from jebm_od.serving.app import create_app
    from outlier_jebm.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, "--epochs", "1", db="mlflow.db")
    images, _ = digits01
    folder = tmp_path / "imgs"
    folder.mkdir()
    digit = (images[0] * 255).astype(np.uint8)
    Image.fromarray(digit).save(folder / "a_normal.png")
    Image.fromarray(255 - digit).save(folder / "b_paper.png")  # the same digit, dark on light

    rows = {}
    for polarity in ("keep", "auto"):
        res = runner.invoke(
            app,
            ["score", str(folder), "--model", "m", "--out", f"{polarity}.json", "--polarity", polarity],
            env={"COLUMNS": "200"},
        )
        assert res.exit_code == 0, res.output
        said = " ".join(res.output.split())
        assert "1 image is dark on light; it was" in said
        assert ("inverted to light-on-dark before scoring" if polarity == "auto" else "scored as it is") in said
        rows[polarity] = {
            r["path"].rsplit("/", 1)[-1]: r for r in json.loads((tmp_path / f"{polarity}.json").read_text())
        }
    # auto scores the inverted paper image as the original; keep scores the pixels given
    assert rows["auto"]["b_paper.png"]["score"] == pytest.approx(rows["auto"]["a_normal.png"]["score"], rel=1e-4)
    assert rows["keep"]["b_paper.png"]["score"] != pytest.approx(rows["keep"]["a_normal.png"]["score"], rel=1e-2)
    assert runner.invoke(app, ["score", str(folder), "--model", "m", "--polarity", "flip"]).exit_code == 2

    # the fit's choice is the model's default for score (and serve), and Spark refuses the option
    assert load_model(tmp_path / "m").meta["polarity"] == "keep"
    res = runner.invoke(app, ["score", str(folder), "--model", "m", "--engine", "spark", "--polarity", "auto"])
    assert res.exit_code == 2 and "--engine spark" in res.output

    # the server makes the same choice for encoded images
    paper = (folder / "b_paper.png").read_bytes()
    for polarity in ("keep", "auto"):
        with TestClient(create_app(load_model(tmp_path / "m"), polarity=polarity)) as client:
            assert client.get("/v1/model").json()["polarity"] == polarity
            got = client.post("/v1/score", files={"x": ("b_paper.png", paper, "image/png")}).json()["predictions"][0]
            assert got["score"] == pytest.approx(rows[polarity]["b_paper.png"]["score"], rel=1e-5, abs=1e-6)


def test_score_table_keeps_headers_and_component_names_whole_at_60_columns(monkeypatch, capsys):
    from pathlib import Path
    from types import SimpleNamespace

    from jebm_od.cli.score import _print_score_summary

    monkeypatch.setenv("COLUMNS", "60")
    folder = Path("/data/images_eval")
    rows = [
        (0.9 - i / 10, str(folder / "sub" / f"a-rather-long-file-name-{i}.png"), 1, "latent_knn_cos", 1.0)
        for i in range(3)
    ]
    loaded = SimpleNamespace(path=Path("m"), calibration={"false_alarm_rate": 0.05})
    _print_score_summary(3, 3, [], rows, loaded, None, None, inputs=[folder])
    out = capsys.readouterr().out
    assert "score [0-1]" in out and "top component" in out  # no header wraps
    assert out.count("latent_knn_cos") == 3  # the longest component name, whole on every row
    for i in range(3):  # the path gives way from the left, keeping the file name's end
        assert f"name-{i}.png" in out


def test_an_mlflow_store_that_fails_is_one_line_naming_it_and_a_fit_logged_at_its_end_keeps_the_model(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = _write_config(tmp_path / "tiny.yaml")
    base = ["fit", "--data", "digits", "--config", str(cfg), "--epochs", "1", "--max-train", "200"]
    res = runner.invoke(app, [*base, "--out", "m", "--tracking-uri", "bogus://store"])
    said = " ".join(res.output.split())
    assert res.exit_code == 1 and "MLflow tracking at bogus://store: could not start a run" in said, res.output
    assert "--no-track" in said and "Traceback" not in res.output and not (tmp_path / "m").exists()
    (tmp_path / "notes.txt").write_text("not a database")  # SQLAlchemy's own error, not MLflow's
    res = runner.invoke(app, [*base, "--out", "m", "--tracking-uri", f"sqlite:///{tmp_path / 'notes.txt'}"])
    said = " ".join(res.output.split())
    assert res.exit_code == 1 and "could not start a run" in said and "file is not a database" in said, res.output

    # a store that fails after training: the model is complete and calibrated, and the error says so
    from mlflow.exceptions import MlflowException

    import outlier_jebm.registry as registry

    def broken(*args, **kwargs):
        raise MlflowException("artifact store is full")

    monkeypatch.setattr(registry, "log_pyfunc", broken)
    res = runner.invoke(app, [*base, "--out", "m2", "--tracking-uri", f"sqlite:///{tmp_path / 'db.sqlite'}"])
    said = " ".join(res.output.split())
    assert res.exit_code == 1 and "could not log the pyfunc model: artifact store is full" in said, res.output
    assert "the model in m2 is complete and calibrated" in said and "Traceback" not in res.output
    assert (tmp_path / "m2" / "calibration.json").is_file()
    from outlier_jebm.checkpoint import load_model

    assert load_model(tmp_path / "m2").calibration is not None
    run = sqlite3.connect(tmp_path / "db.sqlite").execute("select status from runs").fetchall()
    assert run == [("FAILED",)]


def test_fit_says_when_min_steps_raises_the_epochs_asked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write_config(tmp_path / "tiny.yaml", min_steps=20, batch_size=100)
    base = ["fit", "--data", "digits", "--config", str(cfg), "--max-train", "300", "--no-track"]
    res = runner.invoke(app, [*base, "--epochs", "1", "--out", "m"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    epochs = json.loads((tmp_path / "m" / "config.json").read_text())["config"]["train"]["epochs"]
    assert epochs > 1 and f"{epochs} epochs of" in said and "raises the 1 asked for" in said
    res = runner.invoke(app, [*base, "--epochs", "1", "--set", "train.min_steps=0", "--out", "m0"])
    assert res.exit_code == 0 and "raises" not in res.output, res.output
    assert json.loads((tmp_path / "m0" / "config.json").read_text())["config"]["train"]["epochs"] == 1
