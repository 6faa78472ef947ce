"""Does an ensemble of fits on one split, differing only in their initial seed, detect better than one fit?

    python benchmarks/ensemble.py --config configs/mnist.yaml --holdout 1 --seed 0 --members 2 --epochs 7
                                  [--set train.threads=1] --out ensemble.csv [--scores scores.npz]

The split is the bench's: ``prepare_data(mnist, holdout=D, seed=S)`` (clean), so member 0 (``train.seed``
= S) is the model ``jebm-od bench --seeds S`` would fit at the same settings; member k has ``train.seed``
= S + 1000 k, on the same training, held-in and test images. Every member is fitted, calibrated on the
held-in part and scored on the test part exactly as ``jebm-od bench`` does (``run_fit``, ``Scorer``),
without the fit-end sample metrics. The ensemble's score is the mean of the members' calibrated scores
(each a mean of robust z-scores fitted on the held-in part, so they share a scale); no test label enters
it. Writes one CSV row per member and one for the ensemble (AUPRC, AUROC, seconds), appending to
``--out``; ``--scores`` keeps the test scores and labels for re-combining.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIELDS = [
    "holdout",
    "seed",
    "split",
    "members",
    "epochs",
    "member",
    "train_seed",
    "auprc",
    "auroc",
    "fit_seconds",
    "score_seconds",
    "n_test",
    "overrides",
]


def parse_set(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (eq and dot and name):
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--holdout", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE, as the bench's overrides")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scores", type=Path, default=None)
    ap.add_argument("--models", type=Path, default=None, help="where the members are written (default: a temp dir)")
    args = ap.parse_args()

    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.config import Config
    from outlier_jebm.evaluate import detection_metrics
    from outlier_jebm.pipeline import prepare_data, run_fit
    from outlier_jebm.scoring import Scorer

    base = Config.from_yaml(args.config)
    overrides = parse_set(args.set)
    base = base.with_overrides(**overrides) if overrides else base
    td = prepare_data(
        args.data,
        holdout=args.holdout,
        seed=args.seed,
        val_fraction=base.train.val_fraction,
        image_size=base.model.image_size,
        channels=base.model.channels,
        data_kind=base.model.data_kind,
        split="clean",
    )
    y = np.asarray(td.test_is_anomaly).astype(int)
    print(
        f"holdout {args.holdout} seed {args.seed}: {len(td.train)} training, {len(td.val)} held-in, "
        f"{len(td.test)} test images ({100 * y.mean():.1f} % anomalies)",
        flush=True,
    )
    models = args.models or Path(tempfile.mkdtemp(prefix="jebm-ensemble-"))
    rows, member_scores = [], []
    common = {
        "holdout": args.holdout,
        "seed": args.seed,
        "split": "clean",
        "members": args.members,
        "epochs": args.epochs,
        "n_test": len(y),
        "overrides": " ".join(args.set),
    }
    for k in range(args.members):
        train_seed = args.seed + 1000 * k
        cfg = base.with_overrides(train={"seed": train_seed, "epochs": args.epochs, "sample_metrics": 0})
        out_dir = models / f"holdout{args.holdout}-seed{args.seed}-member{k}"
        t = time.perf_counter()
        run_fit(cfg, td, out_dir=out_dir, track=False, remember=False)
        fit_seconds = time.perf_counter() - t
        scorer = Scorer(load_model(out_dir, device="cpu"), device="cpu")
        t = time.perf_counter()
        s = np.asarray(scorer.score(td.test)["score"], dtype=np.float64)
        score_seconds = time.perf_counter() - t
        member_scores.append(s)
        m = detection_metrics(y, s)
        rows.append(
            {
                **common,
                "member": k,
                "train_seed": train_seed,
                **m,
                "fit_seconds": fit_seconds,
                "score_seconds": score_seconds,
            }
        )
        print(f"  member {k} (train.seed {train_seed}): AUPRC {m['auprc']:.4f}  fit {fit_seconds:.0f} s", flush=True)
    mean = np.mean(member_scores, axis=0)
    m = detection_metrics(y, mean)
    rows.append(
        {
            **common,
            "member": "mean",
            "train_seed": "",
            **m,
            "fit_seconds": sum(r["fit_seconds"] for r in rows),
            "score_seconds": sum(r["score_seconds"] for r in rows),
        }
    )
    print(f"  ensemble of {args.members} (mean of calibrated scores): AUPRC {m['auprc']:.4f}", flush=True)
    new = not args.out.exists()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    if args.scores:
        np.savez(args.scores, labels=y, scores=np.stack(member_scores))


if __name__ == "__main__":
    main()
