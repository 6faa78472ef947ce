"""The backbone ablation over seeds: AUPRC, sample FID, fit time and scoring speed per labelled group of bench CSVs.

    python benchmarks/backbone_table.py A/results.csv=mlp B/results.csv=conv C/results.csv=conv \
        [--scores score,component:neg_log_joint] [--split clean] [--variant 'jebm(:scheme=mle.*)?'] \
        [--fid-override FILE]

Each CSV (as `jebm-od bench` wrote it) is read with the label after ``=`` (the config the bench ran with is not in
its rows, so the caller names it). Only jebm rows of the variants that ``--variant`` matches in full (default: the
plain ``jebm``, the base config with no ablation setting) with status ok on ``--split`` are read; the same script
makes the scheme ablation's table, a label per scheme. ``--fid-override`` (rows ``label digit seed fid``) replaces
the FID of the cells it names, for figures re-measured at another sampler length. A (label, score, digit, seed)
cell found twice must agree, or the script stops. Prints one markdown table per metric: mean ± std over the seeds found (n) per digit, and the mean
over digits of the cells that every label has.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd
from prior_table import override_fid
from prior_table import table as group_table


def load(items: list[str], split: str, variant: str = "jebm") -> pd.DataFrame:
    frames = []
    for item in items:
        path, _, label = item.partition("=")
        if not label:
            raise SystemExit(f"{item}: expected PATH=LABEL")
        d = pd.read_csv(path)
        ours = d.model.map(lambda m: re.fullmatch(variant, m) is not None)
        d = d[(d.family == "jebm") & ours & (d.status == "ok") & (d.split == split)].copy()
        d["config"] = label
        frames.append(d)
    d = pd.concat(frames, ignore_index=True)
    if "sample_steps" not in d:
        d["sample_steps"] = float("nan")
    d["fid_from"] = None  # the file an FID was replaced from (override_fid)
    keys = ["config", "score", "holdout", "seed"]
    for column in ("auprc", "sample_fid_lenet"):
        spread = d.groupby(keys)[column].agg(lambda v: v.max() - v.min())
        if (spread > 1e-9).any():
            raise SystemExit(f"cells disagree between CSVs on {column}:\n{spread[spread > 1e-9]}")
    return d.drop_duplicates(keys)


def table(d: pd.DataFrame, metric: str, digits: int) -> list[str]:
    return group_table(d, metric, digits, by="config", groups=list(dict.fromkeys(d.config)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="PATH=LABEL")
    ap.add_argument("--scores", default="score,component:neg_log_joint")
    ap.add_argument("--split", default="clean", choices=["clean", "published"])
    ap.add_argument("--variant", default="jebm", help="regular expression the bench's model column must match in full")
    ap.add_argument("--fid-override", nargs="*", default=[], help="FILE[=LABEL]: LABEL stands for every row's group")
    args = ap.parse_args()
    d = load(args.csv, args.split, args.variant)
    for item in args.fid_override:
        path, _, label = item.partition("=")
        d = override_fid(d, Path(path), by="config", as_group=label)
    for score in [s for s in args.scores.split(",") if s]:
        print(f"\nAUPRC ({score}), {args.split} split: mean ± std over seeds (n)\n")
        print("\n".join(table(d[d.score == score], "auprc", 3)))
    own = d[d.score == "score"]
    for metric, digits, what in [
        ("sample_fid_lenet", 1, "Sample FID (in-project LeNet features; lower is better)"),
        ("fit_seconds", 0, "Fit seconds (training, calibration)"),
        ("score_images_per_second", 0, "Scoring images/s (test part, as the bench scored it)"),
    ]:
        if metric == "sample_fid_lenet":
            # rows written before the bench recorded it have no sample_steps: their chain ran the training length
            for label, g in own.groupby("config", sort=False):
                measured = g[g.fid_from.isna()]
                steps = sorted({"training length" if pd.isna(v) else str(int(v)) for v in measured.sample_steps})
                steps += sorted({f"as in {v}" for v in g.fid_from.dropna()})
                what += f"\n- {label}: prior Langevin steps of the samples: {', '.join(steps)}"
        print(f"\n{what}\n")
        print("\n".join(table(own, metric, digits)))


if __name__ == "__main__":
    main()
