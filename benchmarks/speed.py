"""Training and scoring throughput of a config on MNIST, with a FLOP count for the roofline.

    python benchmarks/speed.py --model DIR [--train-steps 100] [--score-n 10000] [--steps 0,10] [--batch-size N]
                               [--shifts S]

Measures in one run: training images/s of the default config (steps of the real loop,
prior Langevin share of the step), scoring images/s at each K, and the compute roofline
(fp32 matmul GFLOP/s measured here on square 1024 matrices, divided by FLOPs per image).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time

import numpy as np
import torch

from outlier_jebm import native
from outlier_jebm.checkpoint import load_model
from outlier_jebm.config import Config, default_config_path
from outlier_jebm.data import load_dataset
from outlier_jebm.langevin import prior_langevin
from outlier_jebm.model import JointEBM
from outlier_jebm.scoring import Scorer
from outlier_jebm.train import loss_terms, make_optimizer, to_model_space


def matmul_gflops(trials: int = 7) -> float:
    """Peak fp32 matmul rate here: the best of several timed trials (one trial moves by 2x)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    n = 20
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(n):
            a @ b
        best = max(best, 2 * 1024**3 * n / (time.perf_counter() - t) / 1e9)
    return best


_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)


def _layer_flops(layer: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """Multiply-add FLOPs (2 per product) of one call of a Linear or (transposed) conv layer."""
    if isinstance(layer, torch.nn.Linear):
        return 2 * layer.in_features * layer.out_features * (output.numel() // layer.out_features)
    kernel = math.prod(layer.kernel_size) * layer.in_channels * layer.out_channels // layer.groups
    if isinstance(layer, torch.nn.ConvTranspose2d):  # each input pixel scatters one kernel
        return 2 * kernel * (inputs[0].numel() // layer.in_channels)
    return 2 * kernel * (output.numel() // layer.out_channels)


def forward_flops(model_dir: str, images: np.ndarray) -> dict[str, float]:
    """FLOPs per image of one K = 0 scoring pass, per part of the model (encoder, generator, ebm).

    Counted from the shapes seen by the Linear and conv layers during the pass, so a conv
    backbone is counted like an MLP; activations, norms and the kNN search are not counted.
    (torch's ``FlopCounterMode`` gives the same total; it does not split it by these parts.)
    """
    scorer = Scorer(load_model(model_dir), steps=0)
    totals = {"encoder": 0, "generator": 0, "ebm": 0}
    hooks = []
    for part in totals:
        for layer in getattr(scorer.model, part).modules():
            if isinstance(layer, _LAYERS):

                def hook(layer, inputs, output, part=part):
                    totals[part] += _layer_flops(layer, inputs, output)

                hooks.append(layer.register_forward_hook(hook))
    scorer.components_of(images)
    for h in hooks:
        h.remove()
    return {part: n / len(images) for part, n in totals.items()}


def bench_train(cfg: Config, images: np.ndarray, steps: int) -> dict:
    torch.manual_seed(0)
    model = JointEBM(cfg.model).train()
    opt = make_optimizer(model, cfg)
    x = to_model_space(images)
    bs = cfg.train.batch_size
    params = list(model.parameters())

    def step(i):
        xb = x[(i * bs) % (len(x) - bs) :][:bs]
        loss, _ = loss_terms(model, xb, cfg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()

    for i in range(5):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    full = (time.perf_counter() - t) / steps
    pr = cfg.train.prior_langevin
    t = time.perf_counter()
    for _ in range(steps // 4):
        prior_langevin(model, bs, steps=pr.steps, step_size=pr.step_size)
    langevin = (time.perf_counter() - t) / (steps // 4)
    return {"train_images_per_second": bs / full, "step_seconds": full, "prior_langevin_share": langevin / full}


def bench_score(
    model_dir: str, images: np.ndarray, k: int, batch_size: int | None = None, shifts: int | None = None
) -> dict:
    scorer = Scorer(load_model(model_dir), steps=k)
    if batch_size:
        scorer.score_cfg.batch_size = batch_size
    if shifts is not None:
        scorer.score_cfg.shifts = shifts
    scorer.components_of(images[: scorer.score_cfg.batch_size])
    t = time.perf_counter()
    scorer.components_of(images)
    sec = time.perf_counter() - t
    m = scorer.model
    parts = forward_flops(model_dir, images[:256])
    fwd = sum(parts.values())
    # latent_knn and latent_knn_cos: one shared product against the reference set (2 R Z), or one
    # each (4 R Z) for a reference holding a zero row; the per-entry key transforms, the top-k
    # and the exact distances of the k + 1 candidates are not counted
    ref = scorer.reference
    knn = (2 if ref.shared_product else 4) * len(ref) * m.z_dim if ref is not None else 0
    # each Langevin step: a forward and a backward for the input gradient only (no weight
    # gradients), about 2x a forward, through generator (with T and T^-1) and EBM
    per_image = fwd + knn + k * 2 * (parts["generator"] + parts["ebm"])
    # score.shifts: four moved copies each go through the encoder, the same K steps and both searches
    moves = 4 if scorer.score_cfg.shifts else 0
    per_image += moves * (parts["encoder"] + knn + k * 2 * (parts["generator"] + parts["ebm"]))
    return {
        "k": k,
        "batch_size": scorer.score_cfg.batch_size,
        "shifts": scorer.score_cfg.shifts,
        "images_per_second": len(images) / sec,
        "flops_per_image": per_image,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a fitted model directory (for scoring)")
    ap.add_argument("--config", default=str(default_config_path()))
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--score-n", type=int, default=10000)
    ap.add_argument("--steps", default="0,10")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="scoring batch (default: the model's score.batch_size)"
    )
    ap.add_argument("--shifts", type=int, default=None, help="score.shifts (default: the model's)")
    args = ap.parse_args()
    images = load_dataset("mnist").images[-args.score_n - 10000 :]
    cfg = Config.from_yaml(args.config)
    gflops = matmul_gflops()
    out = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "matmul_gflops": gflops,
        "knn_search": native.status(),
        "train": bench_train(cfg, images[:10000], args.train_steps),
        "score": [],
    }
    for k in [int(s) for s in args.steps.split(",")]:
        r = bench_score(args.model, images[-args.score_n :], k, args.batch_size, args.shifts)
        r["roofline_images_per_second"] = gflops * 1e9 / r["flops_per_image"]
        r["share_of_roofline"] = r["images_per_second"] / r["roofline_images_per_second"]
        out["score"].append(r)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
