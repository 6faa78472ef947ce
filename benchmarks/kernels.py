"""Kernel-level timings behind the scoring speed, interleaved in one run (no model needed).

    python benchmarks/kernels.py [--refs 47213] [--dim 48] [--batch 500] [--rounds 6]

For one batch of queries against a reference of random latents (the digit-1 model's size by
default), milliseconds per call, median over rounds:

- the fused kNN kernel with both searches, at several column chunks, and with one search only
  (what the second key's epilogue costs);
- the torch search (``nearest_columns``, both searches from one product);
- the fused kernel right after a torch matrix product, for the OpenMP build (on torch's own
  runtime) and for a build without OpenMP (rows split between Python threads): torch's
  OpenMP workers keep spinning after a parallel op and compete with foreign threads;
- ``torch.tanh`` against ``fast_tanh`` on a decoder output (batch x 784).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch

from outlier_jebm import native
from outlier_jebm.knn import References, nearest_columns
from outlier_jebm.model import fast_tanh


def timed(fn, n: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def load_without_openmp(cache: str):
    """The kernel built without -fopenmp into ``cache`` (the environment is restored after)."""
    saved_cache, saved_flags = os.environ.get("JEBM_OD_CACHE"), native.OPENMP
    os.environ["JEBM_OD_CACHE"], native.OPENMP = cache, []
    try:
        return native._load()
    finally:
        native.OPENMP = saved_flags
        if saved_cache is None:
            del os.environ["JEBM_OD_CACHE"]
        else:
            os.environ["JEBM_OD_CACHE"] = saved_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=47213)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"the fused kernel is not available here: {native.status()}")
    torch.manual_seed(0)
    refs = References(torch.randn(args.refs, args.dim))
    packed, scale, shift = refs.fused
    queries = torch.randn(args.batch, args.dim)
    x, w = torch.randn(args.batch, 784), torch.randn(784, 512)
    decoded = torch.randn(args.batch, 784)

    # a second library built without OpenMP, in a scratch cache
    with tempfile.TemporaryDirectory() as scratch:
        plain_lib, plain_status = load_without_openmp(scratch)
        state = dict(native._state)

        def with_python_threads():
            native._state.update(lib=plain_lib, status=plain_status)
            try:
                x @ w
                native.candidates(queries, packed, scale, shift, 6, 1024)
            finally:
                native._state.update(state)

        cases = {
            **{
                f"fused, both searches, chunk {c}": (lambda c=c: native.candidates(queries, packed, scale, shift, 6, c))
                for c in (512, 1024, 2048, 4096)
            },
            "fused, points search only, chunk 1024": lambda: native.candidates(
                queries, packed, scale[:1].contiguous(), shift[:1].contiguous(), 6, 1024
            ),
            "torch search, both searches": lambda: nearest_columns(
                queries, refs.weights, refs.points.chunk, 6, [refs.point_keys, refs.direction_keys]
            ),
            "torch matmul alone (batch x 784 x 512)": lambda: x @ w,
            "matmul then fused (OpenMP build)": lambda: (
                x @ w,
                native.candidates(queries, packed, scale, shift, 6, 1024),
            ),
            "matmul then fused (build without OpenMP, Python threads)": with_python_threads,
            "torch.tanh (batch x 784)": lambda: torch.tanh(decoded),
            "fast_tanh (batch x 784)": lambda: fast_tanh(decoded.clone()),
            "clone alone (batch x 784), part of the line above": lambda: decoded.clone(),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name].append(timed(fn))
    flops = 2 * packed.shape[0] * 16 * args.dim * args.batch
    out = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "knn_search": native.status(),
        "refs": args.refs,
        "dim": args.dim,
        "batch": args.batch,
        "ms_median": {name: round(statistics.median(v), 3) for name, v in times.items()},
        "fused_gflops_chunk_1024": round(flops / statistics.median(times["fused, both searches, chunk 1024"]) / 1e6, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
