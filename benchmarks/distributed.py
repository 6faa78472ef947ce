"""Data-parallel training throughput: one process against several (torchrun, gloo on CPU).

    python benchmarks/distributed.py [--max-train 10000] [--epochs 1] [--runs 1:100,2:100] [--cores 2] [--repeats 1]

Each run is ``procs:batch`` (batch per rank) and is launched with torchrun on
loopback; the cores of the machine are shared out evenly (``--cores`` threads
in all: 2 threads for one process, 1 each for two). Every run trains the same
config on the same MNIST images (digit 3 held out) from the same seed, without
validation, and reports the training loop's own images/s for all ranks
together (an epoch's images over its wall time). With ``--repeats`` the runs
are interleaved that many times and the best of each is compared (on a shared
machine, the least disturbed). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: join the group, train, and (rank 0) write what it measured."""
    import torch

    from outlier_jebm.config import Config
    from outlier_jebm.distributed import ProcessGroup
    from outlier_jebm.model import JointEBM
    from outlier_jebm.pipeline import prepare_data
    from outlier_jebm.train import fit, seed_everything

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = Config.from_yaml(args.config).with_overrides(train={"epochs": args.epochs, "batch_size": args.batch})
    data = prepare_data(
        "mnist",
        holdout=3,
        seed=cfg.train.seed,
        val_fraction=cfg.train.val_fraction,
        max_train=args.max_train,
        image_size=cfg.model.image_size,
    )
    group = ProcessGroup.join(torch.device("cpu"))
    seed_everything(cfg.train.seed)
    model = JointEBM(cfg.model)
    t0 = time.perf_counter()
    result = fit(model, cfg, data.train, None, args.out_dir)
    wall = time.perf_counter() - t0
    group.close()
    if group.is_main:
        last = result.history[-1]
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "procs": group.world_size,
                    "threads_per_proc": torch.get_num_threads(),
                    "batch_per_rank": args.batch,
                    "global_batch": args.batch * group.world_size,
                    "images": len(data.train),
                    "epochs": args.epochs,
                    "images_per_second": last["images_per_second"],
                    "seconds_per_epoch": last["seconds_per_epoch"],
                    "fit_wall_seconds": wall,
                    "final_loss": last["loss"],
                }
            )
        )


def launch(procs: int, batch: int, args: argparse.Namespace, tmp: Path) -> dict:
    threads = max(1, args.cores // procs)
    out = tmp / f"{procs}x{batch}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(procs),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--config",
        args.config,
        "--max-train",
        str(args.max_train),
        "--epochs",
        str(args.epochs),
        "--batch",
        str(batch),
        "--out-dir",
        str(tmp / f"model-{procs}x{batch}"),
        "--json-out",
        str(out),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(out.read_text())
    result["launch_wall_seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "mnist.yaml"))
    ap.add_argument("--max-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runs", default="1:100,2:100", help="procs:batch-per-rank, comma separated")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared out over the ranks")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all runs; the best of each is compared")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=100, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    runs = [tuple(int(v) for v in spec.split(":")) for spec in args.runs.split(",")]
    load_before = os.getloadavg()
    rounds: list[list[dict]] = [[] for _ in runs]
    with tempfile.TemporaryDirectory(prefix="jebm-dist-bench-") as tmp:
        for _ in range(args.repeats):
            for i, (procs, batch) in enumerate(runs):
                rounds[i].append(launch(procs, batch, args, Path(tmp)))
    results = []
    for measured in rounds:
        best = max(measured, key=lambda r: r["images_per_second"])
        results.append({**best, "images_per_second_each_round": [r["images_per_second"] for r in measured]})
    base = results[0]["images_per_second"]
    for r in results:
        r["speedup_vs_first"] = r["images_per_second"] / base
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo on loopback",
                "commit": subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
                ).stdout.strip(),
                "date": time.strftime("%Y-%m-%d"),
                "config": args.config,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "runs": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
