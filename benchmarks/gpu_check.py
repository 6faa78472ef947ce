"""One call on a lent GPU: does ``--device cuda`` work end to end, what does it buy, and a wider conv as a lead.

    python benchmarks/gpu_check.py --data-dir DIR --out OUT [--limit 560]

Run from a checkout on a machine with the libraries but no install of jebm-od (``gpu_mle.py``'s shim).

1. **The CUDA path**: ``jebm-od bench --data digits --holdout 3 --device cuda`` (fit, fit-end sample metrics,
   calibration, scoring on the GPU), then the same model scored on the CPU and on the GPU: the largest
   difference of each score component, and both AUPRCs.
2. **Speed**: ``train_step.py --device cuda`` for the conv default (variational) and for ``train.scheme=mle``,
   one process; scoring images/s of the conv default on MNIST test images at K = 0 and K = 10, batch 1000.
3. **A lead, not a selection**: the conv default with ``model.conv_channels=48`` on digits 1 and 9, seed 0,
   in the time left (stopped at the limit; its epoch lines are in ``wide.log`` either way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_mle import ROOT, run_until, say, shim_env  # noqa: E402

DEVICE = "cuda"  # --device: cpu only to try this script out

sys.path.insert(0, str(ROOT))


def bench(env: dict[str, str], args: list[str], log: Path, stop_at: float) -> int | None:
    return run_until([sys.executable, "-m", "jebm_od.cli.main", "bench", *args], env, log, stop_at)


def cuda_path(env: dict[str, str], work: Path, out: Path, data_dir: str, stop_at: float) -> dict:
    import torch
    from sklearn.metrics import average_precision_score

    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.pipeline import prepare_data
    from outlier_jebm.scoring import Scorer

    bdir = work / "digits-cuda"
    rc = bench(
        env,
        ["--data", "digits", "--holdout", "3", "--seeds", "0", "--detectors", "jebm", "--components", "none"]
        + ["--no-track", "--device", DEVICE, "--out", str(bdir), "--data-dir", data_dir],
        out / "digits.log",
        stop_at,
    )
    report: dict = {"bench_exit": rc}
    # the bench may fail after the model is written (its figures need matplotlib): compare whatever was calibrated
    model_dir = next((p for p in (bdir / "models").glob("*") if (p / "calibration.json").is_file()), None)
    if model_dir is None:
        return report
    cfg = json.loads((model_dir / "config.json").read_text())["config"]
    td = prepare_data("digits", holdout=3, seed=0, val_fraction=cfg["train"]["val_fraction"])
    tables = {}
    for dev in ("cpu", DEVICE):
        scorer = Scorer(load_model(model_dir, device=dev), device=dev)
        tables[dev] = scorer.score(td.test)
    y = td.test_is_anomaly
    report["auprc"] = {dev: float(average_precision_score(y, t["score"])) for dev, t in tables.items()}
    diffs = {}
    for key, a in tables["cpu"].items():
        b = tables[DEVICE].get(key)
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and b is not None and a.shape == b.shape:
            scale = float(np.max(np.abs(a))) or 1.0
            diffs[key] = {
                "max_abs": float(np.max(np.abs(a - b))),
                "max_rel_to_range": float(np.max(np.abs(a - b)) / scale),
            }
    report["cpu_vs_cuda"] = diffs
    report["torch"] = torch.__version__
    report["device"] = DEVICE
    for name, read in (
        ("tf32_conv", lambda: torch.backends.cudnn.allow_tf32),
        ("tf32_matmul", lambda: torch.backends.cuda.matmul.allow_tf32),
    ):
        try:  # what explains a CPU/GPU difference; read defensively, as these flags are being replaced in torch
            report[name] = bool(read())
        except Exception as exc:
            report[name] = repr(exc)
    if (bdir / "results.csv").is_file():
        (out / "digits-results.csv").write_text((bdir / "results.csv").read_text())
    return report


def speed(env: dict[str, str]) -> dict:
    report: dict = {}
    for name, sets in (("variational", []), ("mle", ["--set", "train.scheme=mle"])):
        cmd = [sys.executable, "train_step.py", "--config", str(ROOT / "configs" / "mnist.yaml"), "--device", DEVICE]
        res = subprocess.run(
            cmd + sets + ["--steps", "30", "--rounds", "3"],
            cwd=ROOT / "benchmarks",
            env=env,
            capture_output=True,
            text=True,
        )
        line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-400:]
        report[f"train_step_{name}"] = json.loads(line) if line.startswith("{") else line
        say(f"train step {name}: {line[:200]}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=float, default=560.0)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try this script out")
    ap.add_argument("--extra", default="", help="more options for part 3's bench, to try this script out")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = shim_env()
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    stop_at = t0 + args.limit - 20
    report: dict = {}

    try:
        report["cuda_path"] = cuda_path(env, work, out, args.data_dir, min(stop_at, t0 + 150))
    except Exception as exc:  # report and go on: the other parts still tell something
        report["cuda_path"] = {"error": repr(exc)}
    say(f"cuda path: {json.dumps(report['cuda_path'])[:1500]}")
    (out / "report.json").write_text(json.dumps(report, indent=1))

    try:
        report["speed"] = speed(env)
        report["speed"]["scoring"] = scoring_speed(args.data_dir, args.device)
    except Exception as exc:
        report.setdefault("speed", {})["error"] = repr(exc)
    say(f"speed: {json.dumps(report['speed'])[:1500]}")
    (out / "report.json").write_text(json.dumps(report, indent=1))

    wdir = work / "wide"
    bench(
        env,
        ["--config", str(ROOT / "configs" / "mnist.yaml"), "--holdout", "1,9", "--seeds", "0"]
        + ["--detectors", "jebm:model.conv_channels=48:train.sample_metrics=0", "--components", "all"]
        + ["--no-track", "--device", DEVICE, "--jobs", "2", "--out", str(wdir), "--data-dir", args.data_dir]
        + args.extra.split(),
        out / "wide.log",
        stop_at,
    )
    for name in ("results.csv", "results.md"):
        if (wdir / name).is_file():
            (out / f"wide-{name}").write_text((wdir / name).read_text())
    models = sorted(p for p in (wdir / "models").glob("*") if (p / "weights.safetensors").is_file())
    for i, m in enumerate(models):
        with tarfile.open(out / f"wide-model-{i}.tar", "w") as tar:
            for f in ("weights.safetensors", "config.json", "calibration.json"):
                if (m / f).is_file():
                    tar.add(m / f, arcname=f"{m.name}/{f}")
    say(f"{len(models)} wide model(s) packed; {time.monotonic() - t0:.0f} s in all")
    (out / "report.json").write_text(json.dumps(report, indent=1))


def scoring_speed(data_dir: str, device: str = "cuda") -> dict:
    """Images/s of a conv default at its initial weights (they score as fast as trained ones) on 10 000 MNIST
    images, with its reference latents (47 000 training images) and calibration written as a fit writes them."""
    import torch

    from outlier_jebm.checkpoint import load_model, save_model
    from outlier_jebm.config import Config
    from outlier_jebm.mnist import load_mnist
    from outlier_jebm.model import JointEBM
    from outlier_jebm.scoring import Scorer, calibrate

    cfg = Config.from_yaml(ROOT / "configs" / "mnist.yaml")
    images = load_mnist(data_dir).images
    d = Path(tempfile.mkdtemp(prefix="speed-model-"))
    torch.manual_seed(0)
    save_model(JointEBM(cfg.model), cfg, d)
    calibrate(load_model(d), images[:47_000], images[47_000:49_500], device=device)
    test = images[-10_000:]
    res = {}
    for steps in (0, 10):
        scorer = Scorer(load_model(d, device=device), steps=steps, device=device)
        scorer.score(test[:1000])  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            scorer.score(test)  # returns numpy arrays: the device's work is done when it returns
            times.append(time.perf_counter() - t)
        res[f"K{steps}_images_per_second"] = len(test) / min(times)
    return res


if __name__ == "__main__":
    main()
