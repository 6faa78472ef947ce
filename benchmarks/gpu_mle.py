"""The scheme ablation's MLE cells on a lent GPU, sized to the time the lease leaves.

    python benchmarks/gpu_mle.py --data-dir DIR --out OUT [--limit 540] [--holdout 5,7,9] [--seeds 0,1,2]

Run from a checkout on a machine that has the libraries but no install of jebm-od (a lent GPU machine):
it puts the checkout's ``cli`` and ``serving`` under the ``jebm_od`` name for the processes it starts.

1. Probe: ``train_step.py --device cuda`` for the MLE scheme in k processes at once (k = 3, 6, 9, one
   GPU shared, stopping at the first k that would not finish), the median step time of each k.
2. Plan, by the rule written in RESULTS.md before the run: one cell is ``epochs x steps per epoch`` steps
   at the probed step time, times 1.25 for validation, calibration and scoring, plus 60 s. The run takes
   the most seeds (of ``--seeds``, in order) whose cells all finish, at that many cells at once, before
   ``--limit`` minus 30 s.
3. ``jebm-od bench --device cuda`` on those cells (``train.max_recon_rise=0``: without the breakdown guard, as
   the MLE rows of digits 1 and 4 were fitted; ``train.sample_metrics=0``: the sample FID is
   measured afterwards with ``jebm-od sample --metrics`` on the CPU, where the same cached LeNet
   as every other row's is used). Stopped at the limit; the rows finished by then are in results.csv.
4. Copies results.csv/md, settings.json, the log and the probe to OUT, and packs each model's weights
   and config (not its reference latents) into tar files of at most three models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def shim_env() -> dict[str, str]:
    """PYTHONPATH with the checkout and a ``jebm_od`` package whose ``cli`` and ``serving`` are the checkout's."""
    shim = Path(tempfile.mkdtemp(prefix="jebm-shim-"))
    (shim / "jebm_od").mkdir()
    (shim / "jebm_od" / "__init__.py").write_text("")
    for name in ("cli", "serving"):
        (shim / "jebm_od" / name).symlink_to(ROOT / name)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(shim), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_until(cmd: list[str], env: dict[str, str], log: Path, stop_at: float) -> int | None:
    """Run cmd (output to log) until it ends or the monotonic clock reaches stop_at; then stop it and its workers."""
    say("run: " + " ".join(cmd))
    with open(log, "w") as fh:
        # its own process group, so that the bench's spawned workers can be stopped with it
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=dict(env, COLUMNS="200"), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        while proc.poll() is None and time.monotonic() < stop_at:
            time.sleep(2)
        if proc.poll() is None:
            say("limit reached: stopping it (the bench's rows finished so far are kept)")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    say(f"exit {proc.returncode}")
    return proc.returncode


def probe(env: dict[str, str], k: int, steps: int, device: str) -> list[float]:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_step.py"),
        "--config",
        str(ROOT / "configs" / "mnist.yaml"),
        "--set",
        "train.scheme=mle",
        "--device",
        device,
        "--steps",
        str(steps),
        "--rounds",
        "1",
    ]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT / "benchmarks", env=env, stdout=subprocess.PIPE, text=True) for _ in range(k)
    ]
    out = [p.communicate()[0] for p in procs]
    return [json.loads(o.strip().splitlines()[-1])["median_ms"] for o in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=float, default=540.0, help="seconds this script may run in all")
    ap.add_argument("--holdout", default="5,7,9")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--probe-steps", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=10, help="the config's train.epochs (for the plan only)")
    ap.add_argument("--steps-per-epoch", type=int, default=470, help="about 47 000 images / 100 (plan only)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try this script out")
    ap.add_argument("--extra", default="", help="more bench options, to try this script out (e.g. --max-train 300)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = shim_env()
    holdouts = args.holdout.split(",")
    seeds = args.seeds.split(",")

    # probe one seed's cells at once, then two, ...; stop at the first count that would not finish in time
    probes: dict[int, float] = {}
    n_seeds = 0
    for n in range(1, len(seeds) + 1):
        k = len(holdouts) * n
        ms = probe(env, k, args.probe_steps, args.device)
        probes[k] = statistics.median(ms)
        say(f"probe: {k} processes at once, MLE step {probes[k]:.0f} ms (each: {', '.join(f'{m:.0f}' for m in ms)})")
        left = args.limit - (time.monotonic() - T0) - 30
        cell = args.epochs * args.steps_per_epoch * probes[k] / 1000 * 1.25 + 60
        say(f"plan: {n} seed(s), {k} cells at once: about {cell:.0f} s each, {left:.0f} s left")
        if cell > left:
            break
        n_seeds = n
    (out / "probe.json").write_text(json.dumps({str(k): v for k, v in probes.items()}))
    if not n_seeds:
        say("plan: not even one seed's cells fit in the time left; nothing run")
        return
    run_seeds = ",".join(seeds[:n_seeds])
    bench_dir = Path(tempfile.mkdtemp(prefix="bench-")) / "mle-gpu"
    cmd = [
        sys.executable,
        "-m",
        "jebm_od.cli.main",
        "bench",
        "--config",
        str(ROOT / "configs" / "mnist.yaml"),
        "--holdout",
        args.holdout,
        "--seeds",
        run_seeds,
        "--detectors",
        "jebm:scheme=mle:train.sample_metrics=0:train.max_recon_rise=0",
        "--components",
        "all",
        "--no-track",
        "--device",
        args.device,
        "--jobs",
        str(len(holdouts) * n_seeds),
        "--data-dir",
        args.data_dir,
        "--out",
        str(bench_dir),
        *args.extra.split(),
    ]
    run_until(cmd, env, out / "bench.log", T0 + args.limit - 25)
    for name in ("results.csv", "results.md", "settings.json"):
        if (bench_dir / name).is_file():
            shutil.copy(bench_dir / name, out / name)
    models = sorted(p for p in (bench_dir / "models").glob("*") if (p / "weights.safetensors").is_file())
    for i in range(0, len(models), 3):
        with tarfile.open(out / f"models-{i // 3}.tar", "w") as tar:
            for m in models[i : i + 3]:
                for f in ("weights.safetensors", "config.json", "calibration.json"):
                    if (m / f).is_file():
                        tar.add(m / f, arcname=f"{m.name}/{f}")
    say(f"{len(models)} model(s) packed")
    print((bench_dir / "results.md").read_text() if (bench_dir / "results.md").is_file() else "no results.md")


if __name__ == "__main__":
    main()
