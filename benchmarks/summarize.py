"""Per-digit AUPRC mean ± std over seeds, from the CSVs that `jebm-od bench` and rescore.py wrote.

    python benchmarks/summarize.py --rescore a.csv b.csv --score "latent_knn_cos+latent_knn" \
        --bench pyod-s0/results.csv pyod-s12/results.csv [--model jebm]

Rows of the rescore CSVs with the given ``--score`` names (and ``--model`` variant) are our
detector; every non-jebm detector of the bench CSVs is a baseline, and the best baseline per
digit is the one with the highest mean over its seeds. Prints a markdown table with the
published joint-EBM AUPRC alongside.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        with p.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{sd} (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rescore", type=Path, nargs="+", required=True)
    ap.add_argument("--score", nargs="+", required=True, help="score names as rescore.py prints them")
    ap.add_argument("--model", default="jebm", help="model variant in the rescore CSVs")
    ap.add_argument("--bench", type=Path, nargs="*", default=[])
    args = ap.parse_args()

    from outlier_jebm.bench import PUBLISHED_AUPRC

    ours: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in read(args.rescore):
        if r.get("model", "jebm") == args.model and r["score"] in args.score:
            ours[r["score"], int(r["holdout"])][int(r["seed"])] = float(r["auprc"])
    base: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in read(args.bench):
        if r["status"] == "ok" and not r["detector"].startswith("jebm"):
            base[r["detector"], int(r["holdout"])][int(r["seed"])] = float(r["auprc"])
    published = PUBLISHED_AUPRC["joint latent EBM (published)"]
    digits = sorted({h for _, h in ours} | {h for _, h in base})
    head = ["digit", *args.score, "best baseline", "published joint EBM"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for h in digits:
        cells = [str(h)] + [fmt(list(ours[s, h].values())) for s in args.score]
        cands = {d: list(v.values()) for (d, hh), v in base.items() if hh == h}
        if cands:
            best = max(cands, key=lambda d: np.mean(cands[d]))
            cells.append(f"{best} {fmt(cands[best])}")
        else:
            cells.append("-")
        cells.append(f"{published[h]:.3f}" if h in published else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
