"""Training step time of a config at 1 and 2 torch threads, interleaved (why vectors.yaml sets train.threads 1).

    python benchmarks/threads.py [--config configs/vectors.yaml] [--features 30] [--steps 50] [--rounds 3] [--busy]

One step = the real training loss (``train.loss_terms``: encoder, prior Langevin, EBM), backward and
Adam, at the config's batch size, on random standardised vectors (or images for an image config).
``--busy`` runs a second process that keeps one core busy meanwhile, as a test run or another job
on a 2-core machine would. Prints the median step time per thread count over ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import torch

from outlier_jebm.config import Config, for_vectors
from outlier_jebm.model import JointEBM
from outlier_jebm.train import loss_terms, make_optimizer


def spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def step_seconds(cfg: Config, threads: int, steps: int, device: str = "cpu") -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = JointEBM(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    x = torch.randn(cfg.train.batch_size, cfg.model.data_dim, device=device).clamp(-1, 1)
    for _ in range(3):
        loss, _ = loss_terms(model, x, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss, _ = loss_terms(model, x, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/vectors.yaml")
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    args = ap.parse_args()
    cfg = Config.from_yaml(args.config)
    if cfg.model.is_vector:
        cfg = for_vectors(cfg, args.features)
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=spin, args=(stop,)) if args.busy else None
    if busy:
        busy.start()
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(args.rounds):
            for threads in (1, 2):
                times[threads].append(step_seconds(cfg, threads, args.steps))
    finally:
        if busy:
            stop.set()
            busy.join()
    out = {
        "config": args.config,
        "busy": args.busy,
        "step_ms": {k: [1000 * v for v in vs] for k, vs in times.items()},
        "median_ms": {k: 1000 * statistics.median(vs) for k, vs in times.items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
