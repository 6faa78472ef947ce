"""The prior ablation under the score with the one-sided width term, from `width_gate.py` rows and bench CSVs.

    python benchmarks/prior_width_table.py --gate benchmarks/issue14/conv-width-gate/seed2.csv ... \
        --bench benchmarks/issue14/conv-width-gate/seed2-4-results.csv ...

``--gate``: rows of ``width_gate.py``; the prior is read from the model's directory name (``prior_gaussian``,
``prior_layerwise``; none: joint). Per row, three AUPRCs: the default score with the width term at tau 2
(``auprc_gate_2``, the same whether or not the model's own config has ``score.width_margin``), the kNN pair alone
(``auprc_pair``; in files written before that column, ``auprc_default``, which is the pair for a model fitted before
the width term: its ``max_abs_diff_default`` must then be 0, or the script stops) and the width alone.
``--bench``: the CSVs `jebm-od bench` wrote for the same models; the FID (in-project LeNet features) of each cell
is read from its ``score`` row. A (prior, digit, seed) cell found twice must agree, or the script stops.

Prints, per prior and digit, the mean over seeds of each figure, the mean over digits of the cells every prior has,
and per seed the paired difference (joint minus Gaussian) of the five-digit means.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from prior_table import prior_of

FIGURES = {"new": "default (pair + width term)", "pair": "kNN pair alone", "width": "width alone", "fid": "FID"}


def gate_cells(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        for r in pd.read_csv(path).to_dict("records"):
            if "auprc_pair" in r and pd.notna(r["auprc_pair"]):
                pair = r["auprc_pair"]
            elif r["max_abs_diff_default"] == 0:
                pair = r["auprc_default"]
            else:
                raise SystemExit(f"{path}: {r['model']} has no auprc_pair and its default is not the pair alone")
            rows.append(
                {
                    "prior": prior_of(r["model"]),
                    "digit": int(r["holdout"]),
                    "seed": int(r["seed"]),
                    "new": r["auprc_gate_2"],
                    "pair": pair,
                    "width": r["auprc_posterior_width"],
                }
            )
    return _unique(pd.DataFrame(rows), "width_gate rows")


def fid_cells(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        d = pd.read_csv(path)
        d = d[(d["family"] == "jebm") & (d["score"] == "score")]
        rows += [
            {
                "prior": prior_of(r["detector"]),
                "digit": int(r["holdout"]),
                "seed": int(r["seed"]),
                "fid": r["sample_fid_lenet"],
            }
            for r in d.to_dict("records")
        ]
    return _unique(pd.DataFrame(rows), "bench rows")


def _unique(d: pd.DataFrame, what: str) -> pd.DataFrame:
    key = ["prior", "digit", "seed"]
    spread = d.groupby(key).agg(lambda s: s.max() - s.min())
    if (spread.fillna(0).to_numpy() > 1e-9).any():
        raise SystemExit(f"{what}: a cell found twice with different figures:\n{spread[(spread > 1e-9).any(axis=1)]}")
    return d.groupby(key, as_index=False).first()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gate", type=Path, nargs="+", required=True)
    ap.add_argument("--bench", type=Path, nargs="*", default=[])
    args = ap.parse_args()

    cells = gate_cells(args.gate)
    if args.bench:
        cells = cells.merge(fid_cells(args.bench), on=["prior", "digit", "seed"], how="left")
    else:
        cells["fid"] = float("nan")
    digits = sorted(cells["digit"].unique())
    priors = sorted(cells["prior"].unique(), key=lambda p: (p != "joint", p))
    # the cells every prior has, for the means over digits
    counts = cells.groupby(["digit", "seed"])["prior"].nunique()
    shared = counts[counts == len(priors)].index
    common = cells.set_index(["digit", "seed"]).loc[shared].reset_index()

    print("| prior | figure | " + " | ".join(str(d) for d in digits) + " | mean (shared cells) |")
    print("| --- | --- | " + " | ".join("---" for _ in digits) + " | --- |")
    for prior in priors:
        mine = cells[cells["prior"] == prior]
        for fig, title in FIGURES.items():
            per_digit = []
            for d in digits:
                v = mine.loc[mine["digit"] == d, fig]
                fmt = "{:.1f}" if fig == "fid" else "{:.3f}"
                per_digit.append(f"{fmt.format(v.mean())} (n={v.notna().sum()})" if v.notna().any() else "")
            mean = common.loc[common["prior"] == prior, fig].mean()
            print(
                f"| {prior} | {title} | "
                + " | ".join(per_digit)
                + (f" | {mean:.1f} |" if fig == "fid" else f" | {mean:.3f} |")
            )

    if "gaussian" in priors and "joint" in priors:
        print("\nPer seed, joint minus Gaussian, mean over the digits both have at that seed:\n")
        print("| seed | digits | " + " | ".join(FIGURES.values()) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in FIGURES) + " |")
        for seed in sorted(common["seed"].unique()):
            c = common[common["seed"] == seed].set_index(["prior", "digit"])
            j, g = c.loc["joint"], c.loc["gaussian"]
            diff = (j[list(FIGURES)] - g[list(FIGURES)]).mean()
            print(
                f"| {seed} | {','.join(str(d) for d in sorted(j.index))} | "
                + " | ".join(f"{diff[f]:+.3f}" if f != "fid" else f"{diff[f]:+.1f}" for f in FIGURES)
                + " |"
            )


if __name__ == "__main__":
    main()
