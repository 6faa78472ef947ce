"""Spark local scoring (`jebm-od score --engine spark`) against in-process scoring, same images, same run.

    python benchmarks/spark_scoring.py --model DIR [--n 10000] [--master local[2]] [--threads 1] [--repeats 2]

Writes the last N MNIST images (the original test set) as a parquet dataset (column ``pixels``), then measures
- in-process: ``Scorer.score`` on the same images in batches of ``--batch-rows`` with
  ``--threads`` torch threads (what ``jebm-od score`` does, without reading files);
- Spark: ``score_parquet`` (read parquet, the MLflow pyfunc through ``spark_udf``, write
  parquet) on ``--master``, each Python worker with ``--threads`` torch threads; the first
  repeat includes the workers' start and model load, later ones reuse them. The Spark
  session's start is reported on its own.
Prints a markdown table and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in-process and per Spark Python worker")
    ap.add_argument("--batch-rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import pandas as pd
    import torch

    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.data import load_mnist
    from outlier_jebm.scoring import Scorer
    from outlier_jebm.spark import pyfunc_uri_for, quiet, score_parquet, spark_session

    torch.set_num_threads(args.threads)
    quiet()
    images = load_mnist().images[-args.n :].astype(np.float32)  # the last N: MNIST's test images
    work = Path(tempfile.mkdtemp(prefix="spark-bench-"))
    src = work / "in.parquet"
    pd.DataFrame({"id": np.arange(len(images)), "pixels": list(images.reshape(len(images), -1))}).to_parquet(src)

    scorer = Scorer(load_model(args.model))
    scorer.score(images[:256])  # warm-up
    local = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), args.batch_rows):
            scorer.score(images[i : i + args.batch_rows])
        local.append(len(images) / (time.perf_counter() - t0))

    t0 = time.perf_counter()
    spark = spark_session(args.master, threads_per_task=args.threads)
    session_s = time.perf_counter() - t0
    uri = pyfunc_uri_for(args.model, work)
    runs = []
    try:
        for r in range(args.repeats):
            dst = work / f"out{r}.parquet"
            summary = score_parquet(spark, uri, str(src), str(dst), batch_rows=args.batch_rows)
            assert summary.scored == len(images), summary
            runs.append(len(images) / summary.seconds)
        # Scores must equal in-process scores (a benchmark of a wrong answer is worthless).
        got = pd.read_parquet(work / "out0.parquet").sort_values("id")["score"].to_numpy()
        want = scorer.score(images)["score"]
        max_diff = float(np.abs(got - want).max())
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "n": len(images),
        "master": args.master,
        "threads": args.threads,
        "batch_rows": args.batch_rows,
        "in_process_img_s": local,
        "spark_img_s": runs,
        "spark_session_start_s": session_s,
        "ratio_best": max(runs) / max(local),
        "max_abs_score_diff": max_diff,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
    }
    print(
        f"| engine | images/s (per repeat) |\n|---|---|\n"
        f"| in-process, {args.threads} thread(s) | {', '.join(f'{v:.0f}' for v in local)} |\n"
        f"| Spark {args.master}, {args.threads} thread(s)/worker | {', '.join(f'{v:.0f}' for v in runs)} |\n"
    )
    print(
        f"Spark session start {session_s:.1f} s; best Spark / best in-process = {result['ratio_best']:.2f}; "
        f"max |score difference| = {max_diff:.2e}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
