"""Two sets of `jebm-od bench` CSVs for the same cells, compared score by score: is a refit the same model?

    python benchmarks/compare_bench.py --old benchmarks/issue14/conv-published*/results.csv \
        --new benchmarks/issue14/conv-published-width/*results.csv

Reads the jebm rows (the default score and every component) of both sides and joins them on (score, digit, seed,
split); a row found twice on one side must agree, or the script stops. Prints, per score, how many cells both sides
have, the mean and the largest absolute AUPRC difference (new minus old) and how many cells are bit-identical; then,
per cell, the default score's AUPRC and the FID (in-project LeNet features) on each side. Rows of one side only are
counted, not compared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

KEY = ["score", "holdout", "seed", "split"]


def jebm_rows(paths: list[Path], side: str) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths]
    d = pd.concat(frames, ignore_index=True)
    d = d[(d["family"] == "jebm") & (d["status"] == "ok")]
    d = d[KEY + ["auprc", "sample_fid_lenet"]]
    spread = d.groupby(KEY)["auprc"].agg(lambda s: s.max() - s.min())
    if (spread > 0).any():
        raise SystemExit(f"{side}: a cell found twice with different AUPRC:\n{spread[spread > 0]}")
    return d.groupby(KEY, as_index=False).first()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, nargs="+", required=True)
    ap.add_argument("--new", type=Path, nargs="+", required=True)
    args = ap.parse_args()

    old, new = jebm_rows(args.old, "--old"), jebm_rows(args.new, "--new")
    both = old.merge(new, on=KEY, suffixes=("_old", "_new"))
    print(f"cells: {len(both)} on both sides, {len(old) - len(both)} old only, {len(new) - len(both)} new only\n")
    both["diff"] = both["auprc_new"] - both["auprc_old"]
    print("| score | cells | mean new - old | largest abs difference | identical |")
    print("| --- | --- | --- | --- | --- |")
    for score, g in both.groupby("score", sort=True):
        print(
            f"| {score} | {len(g)} | {g['diff'].mean():+.4f} | {g['diff'].abs().max():.4f} | "
            f"{int((g['diff'] == 0).sum())} |"
        )
    cells = both[both["score"] == "score"].sort_values(["holdout", "seed"])
    print("\n| digit | seed | split | default score old | new | FID old | new |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in cells.to_dict("records"):
        print(
            f"| {r['holdout']} | {r['seed']} | {r['split']} | {r['auprc_old']:.4f} | {r['auprc_new']:.4f} | "
            f"{r['sample_fid_lenet_old']:.1f} | {r['sample_fid_lenet_new']:.1f} |"
        )


if __name__ == "__main__":
    main()
