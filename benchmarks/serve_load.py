"""Load benchmark of `jebm-od serve` on loopback, against in-process scoring in the same run.

    python benchmarks/serve_load.py --model models/latest-dir [--batches 1,32,256] [--seconds 20]

Starts the server as a real process, then for each batch size sends pre-encoded requests
from one client (and from ``--clients`` concurrent clients) until ``--requests`` requests
or ``--seconds`` seconds, whichever comes first. Reports images/s and p50/p99 latency
per payload format (JSON pixel arrays, .npy) and the in-process ``Scorer.score``
throughput on the same images, measured in the same process just before. Output: a
markdown table on stdout and ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, steps: int | None, threads: int | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "jebm_od.cli.main",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-body-mb",
        "64",
        "--max-items",
        "4096",
    ]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read()}")
    raise SystemExit("server did not start")


def encode(images: np.ndarray, fmt: str) -> tuple[bytes, str]:
    if fmt == "json":
        return json.dumps({"instances": images.reshape(len(images), -1).round(4).tolist()}).encode(), "application/json"
    buf = io.BytesIO()
    np.save(buf, images.astype(np.float32))
    return buf.getvalue(), "application/x-npy"


def run_load(
    url: str, bodies: list[tuple[bytes, str]], batch: int, max_requests: int, max_seconds: float, clients: int
) -> dict:
    latencies: list[float] = []

    def worker(k: int) -> int:
        n = 0
        with httpx.Client(timeout=120) as c:
            t_end = time.perf_counter() + max_seconds
            i = k
            while n < max_requests // clients and time.perf_counter() < t_end:
                body, ctype = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/score", content=body, headers={"content-type": ctype})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"server answered {r.status_code}: {r.text[:200]}")
                n += 1
                i += clients
        return n

    # warm-up
    with httpx.Client(timeout=120) as c:
        for body, ctype in bodies[:2]:
            c.post(f"{url}/v1/score", content=body, headers={"content-type": ctype})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        n_requests = sum(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "batch": batch,
        "clients": clients,
        "requests": n_requests,
        "images_per_second": n_requests * batch / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "seconds": wall,
    }


def in_process(model: str, images: np.ndarray, batch: int, steps: int | None, seconds: float) -> float:
    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.modeldirs import resolve_model_dir
    from outlier_jebm.scoring import Scorer

    scorer = Scorer(load_model(resolve_model_dir(model)), steps=steps)
    scorer.score(images[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(images) - batch + 1, batch):
            scorer.score(images[i : i + batch])
            n += batch
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--formats", default="json,npy")
    ap.add_argument("--clients", default="1,2")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads, in-process and in the server")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from outlier_jebm.data import load_dataset

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    images = load_dataset("mnist").images[:4096].astype(np.float32)
    batches = [int(b) for b in args.batches.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    port = free_port()
    ref = {b: in_process(args.model, images, b, args.steps, args.seconds / 2) for b in batches}
    proc = start_server(args.model, port, args.steps, args.threads)
    try:
        url = f"http://127.0.0.1:{port}"
        for fmt in args.formats.split(","):
            for b in batches:
                bodies = [encode(images[i : i + b], fmt) for i in range(0, min(len(images), 16 * b), b)]
                for c in clients:
                    row = run_load(url, bodies, b, args.requests, args.seconds, c)
                    row.update(format=fmt, in_process_images_per_second=ref[b], ratio=row["images_per_second"] / ref[b])
                    rows.append(row)
                    print(
                        f"{fmt:5s} batch {b:4d} clients {c}: {row['images_per_second']:8.0f} img/s "
                        f"(in-process {ref[b]:8.0f}, ratio {row['ratio']:.2f})  p50 {row['p50_ms']:.1f} ms  "
                        f"p99 {row['p99_ms']:.1f} ms  ({row['requests']} requests)",
                        flush=True,
                    )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print("\n| format | batch | clients | server img/s | in-process img/s | ratio | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {r['batch']} | {r['clients']} | {r['images_per_second']:.0f} | "
            f"{r['in_process_images_per_second']:.0f} | {r['ratio']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "steps": args.steps,
    }
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
