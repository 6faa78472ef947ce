"""AUPRC per digit and the mean over digits, per (model, score), from rescore.py CSVs.

    python benchmarks/score_table.py A.csv[=LABEL] B.csv[=LABEL] ... [--scores "s1,s2"] [--metric auprc]

One markdown row per (file label, model, score) in the order found; ``--scores`` keeps those
score names only (as rescore.py writes them: a combination ``a+b``, a component ``[name]``,
or ``default (...)``). Seeds are averaged per digit first.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--scores", default="")
    ap.add_argument("--metric", default="auprc")
    args = ap.parse_args()
    keep = [s for s in args.scores.split(",") if s] if args.scores else None
    table: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    digits: set[int] = set()
    for item in args.files:
        path, _, label = item.partition("=")
        with Path(path).open() as fh:
            for row in csv.DictReader(fh):
                if keep is not None and row["score"] not in keep:
                    continue
                d = int(row["holdout"])
                digits.add(d)
                table[(label or Path(path).stem, row["model"], row["score"])][d].append(float(row[args.metric]))
    cols = sorted(digits)
    print("| run | model | score | " + " | ".join(str(d) for d in cols) + " | mean |")
    print("| --- | --- | --- |" + " --- |" * (len(cols) + 1))
    for (label, model, score), per in table.items():
        cells = [f"{np.mean(per[d]):.3f}" if d in per else "-" for d in cols]
        mean = f"{np.mean([np.mean(per[d]) for d in cols]):.3f}" if all(d in per for d in cols) else "-"
        print(f"| {label} | {model} | `{score}` | " + " | ".join(cells) + f" | {mean} |")


if __name__ == "__main__":
    main()
