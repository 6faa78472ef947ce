"""Training and scoring throughput of several configs (backbones), interleaved in one run.

    python benchmarks/backbones.py --configs configs/mnist-mlp.yaml,configs/mnist.yaml,configs/color32.yaml \
        [--train-steps 40] [--score-n 10000] [--reference 47000] [--repeats 2]

For each config: training images/s (``speed.bench_train``: steps of the real loss, batch of
the config, gradient clipping, Adam) and scoring images/s at K = 0 (``speed.bench_score``:
``Scorer.components_of`` with both latent kNN components against ``--reference`` reference
latents). Throughput does not depend on what the weights have learned, so each model is
freshly initialised, its reference set is the posterior means of ``--reference`` images and
it is calibrated on 1 000 more, exactly as ``fit`` would. Inputs: MNIST digits for 28 x 28
gray; for other sizes and 3 channels, the digits resized and coloured (content does not
change the cost). Configs take turns, ``--repeats`` times; the table reports the best of the
repeats (the least disturbed run) and every figure is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from speed import bench_score, bench_train

from outlier_jebm.checkpoint import load_model, save_model
from outlier_jebm.config import Config
from outlier_jebm.data import load_dataset
from outlier_jebm.model import JointEBM
from outlier_jebm.scoring import calibrate


def images_for(cfg: Config, mnist: np.ndarray) -> np.ndarray:
    """MNIST digits as the config's inputs: resized, and tinted per image for 3 channels."""
    m = cfg.model
    out = mnist
    if m.image_size != mnist.shape[-1]:
        from outlier_jebm.geometry import resize_stack as _resize_stack

        out = _resize_stack(mnist, m.image_size)
    if m.channels == 3:
        tint = np.random.default_rng(0).uniform(0.3, 1.0, size=(len(out), 1, 1, 3)).astype(np.float32)
        out = out[..., None] * tint
    return np.ascontiguousarray(out, dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="configs/mnist-mlp.yaml,configs/mnist.yaml,configs/color32.yaml")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--score-n", type=int, default=10000)
    ap.add_argument("--reference", type=int, default=47000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    mnist = load_dataset("mnist").images
    paths = [p.strip() for p in args.configs.split(",") if p.strip()]
    work = Path(tempfile.mkdtemp(prefix="jebm-backbones-"))
    prepared = {}
    for path in paths:
        cfg = Config.from_yaml(path)
        images = images_for(cfg, mnist[: args.reference + 1000 + args.score_n])
        torch.manual_seed(0)
        model_dir = work / Path(path).stem
        save_model(JointEBM(cfg.model), cfg, model_dir)
        calibrate(
            load_model(model_dir),
            images[: args.reference],
            images[args.reference : args.reference + 1000],
            reference_size=0,
        )
        prepared[path] = (cfg, model_dir, images[-args.score_n :])
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for _ in range(args.repeats):
        for path in paths:  # interleaved: each config sees the machine in the same states
            cfg, model_dir, images = prepared[path]
            train = bench_train(cfg, images[:5000], args.train_steps)
            score = bench_score(str(model_dir), images, 0)
            runs[path].append(
                {
                    "train_images_per_second": train["train_images_per_second"],
                    "step_seconds": train["step_seconds"],
                    "prior_langevin_share": train["prior_langevin_share"],
                    "score_images_per_second": score["images_per_second"],
                }
            )
    out = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "reference_latents": args.reference,
        "runs": runs,
    }
    print(json.dumps(out, indent=2))
    print("\n| config | train img/s | s per epoch of 47 000 | score img/s (K = 0) |")
    print("| --- | --- | --- | --- |")
    for path in paths:
        train = max(r["train_images_per_second"] for r in runs[path])
        score = max(r["score_images_per_second"] for r in runs[path])
        print(f"| {path} | {train:,.0f} | {47000 / train:.0f} | {score:,.0f} |")


if __name__ == "__main__":
    main()
