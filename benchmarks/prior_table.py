"""The prior ablation over seeds: AUPRC and sample FID per prior, from the CSVs `jebm-od bench` wrote.

    python benchmarks/prior_table.py benchmarks/issue14/*/results.csv [--z-dims 32,8] [--score score] \
        [--sample-metrics benchmarks/issue14/joint-z32-8/sample_metrics.txt] [--seeds 1,2] [--split published] \
        [--fid-override FILE]

Reads every jebm row with the given ``--score`` (``score``: the default score; or a component such
as ``component:neg_log_joint``) whose variant has the given latent sizes, on the given ``--split``
(default: clean). The prior is read from the
variant's ``prior=`` setting (none: joint). A (prior, digit, seed) cell found in several CSVs must
agree, or the script stops. ``--sample-metrics`` reads the FIDs of bench models measured afterwards
(the output of ``jebm-od sample --model DIR --metrics``, each after a line ``== DIR``) for the
cells whose CSV row has none. ``--fid-override`` replaces the FID of the cells it names (rows
``prior digit seed fid``; ``#`` starts a comment), for figures re-measured later with another sampler
length. Prints three markdown tables:

- AUPRC per prior and digit, mean ± std over the seeds found (n), and the mean over digits of the
  cells that every prior has;
- the sample FID (in-project LeNet features) likewise;
- the paired difference of each prior against the Gaussian one, per seed (only seeds where both have
  all the digits).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd


def prior_of(model: str) -> str:
    """The prior of a bench variant (``prior=gaussian``) or of its model directory (``prior_gaussian``); none: joint."""
    m = re.search(r"prior[_=]([a-z]+)", model)
    return m.group(1) if m else "joint"


def z_dims_of(model: str) -> str:
    m = re.search(r"z_dims=\[([\d, ]+)\]", model)
    return m.group(1).replace(" ", "") if m else "32,16"


def load(paths: list[Path], z_dims: str, score: str, split: str = "clean") -> pd.DataFrame:
    frames = []
    for p in paths:
        d = pd.read_csv(p)
        d = d[(d.family == "jebm") & (d.status == "ok") & (d.score == score)].copy()
        d["source"] = str(p)
        frames.append(d)
    d = pd.concat(frames, ignore_index=True)
    d = d[d.model.map(z_dims_of) == z_dims].copy()
    d["prior"] = d.model.map(prior_of)
    d = d[d.split == split]
    d["fid_from"] = None  # the file an FID was replaced from (override_fid)
    if d.empty:
        raise SystemExit(f"no jebm rows with score {score!r}, z_dims [{z_dims}] and split {split!r}")
    keys = ["prior", "holdout", "seed"]
    spread = d.groupby(keys).auprc.agg(lambda v: v.max() - v.min())
    if (spread > 1e-9).any():
        raise SystemExit(f"cells disagree between CSVs:\n{spread[spread > 1e-9]}")
    return d.drop_duplicates(keys)


def fill_fid(d: pd.DataFrame, path: Path) -> pd.DataFrame:
    blocks = re.findall(
        r"^== (\S+)\n(?:.*\n)*?FID \(in-project LeNet features, not Inception FID\): ([\d.]+)", path.read_text(), re.M
    )
    for model_dir, fid in blocks:
        name = Path(model_dir).name
        m = re.search(r"z_dims_([\d_]+?)(?:_prior_(\w+?))?-holdout(\d+)-seed(\d+)$", name)
        if m is None:
            raise SystemExit(f"{path}: cannot read the variant of {name}")
        z, prior, h, seed = m.group(1).replace("_", ","), m.group(2) or "joint", int(m.group(3)), int(m.group(4))
        hit = (d.prior == prior) & (d.holdout == h) & (d.seed == seed) & (d.model.map(z_dims_of) == z)
        d.loc[hit & d.sample_fid_lenet.isna(), "sample_fid_lenet"] = float(fid)
    return d


def override_fid(
    d: pd.DataFrame, path: Path, by: str = "prior", as_group: str = "", z_dims: str | None = None
) -> pd.DataFrame:
    """Rows ``group digit seed fid`` of ``path`` replace the FID of those cells (``group``: a value of ``by``;
    ``as_group``, when given, stands for every row's). A line ``# z_dims A,B`` names the latent sizes of the
    models measured; given ``z_dims``, they must be those."""
    text = path.read_text()
    declared = re.search(r"^# z_dims ([\d,]+)\s*$", text, re.M)
    if z_dims is not None and declared and declared.group(1) != z_dims:
        raise SystemExit(f"{path}: FIDs of z_dims [{declared.group(1)}] models, not [{z_dims}]")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group, h, seed, fid = line.split()
        group = as_group or group
        hit = (d[by] == group) & (d.holdout == int(h)) & (d.seed == int(seed))
        if not hit.any():
            raise SystemExit(f"{path}: no row for {group} digit {h} seed {seed}")
        d.loc[hit, "sample_fid_lenet"] = float(fid)
        d.loc[hit, "fid_from"] = path.name
    return d


def fmt(v: pd.Series, digits: int) -> str:
    v = v.dropna()
    if v.empty:
        return "-"
    sd = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
    return f"{v.mean():.{digits}f}{sd} ({len(v)})"


def table(d: pd.DataFrame, metric: str, digits: int, by: str = "prior", groups: list[str] | None = None) -> list[str]:
    """One markdown row per group of column ``by`` (``groups``: which, in order; default the three priors)."""
    holdouts = sorted(d.holdout.unique())
    groups = [p for p in (groups or ["joint", "layerwise", "gaussian"]) if p in set(d[by])]
    # the cells (digit, seed) every group has, for a fair mean over digits
    cells = [set(zip(g.holdout, g.seed)) for _, g in d[d[metric].notna()].groupby(by)]
    if not cells:
        return [f"(no {metric} figures in these rows)"]
    common = set.intersection(*cells)
    lines = [f"| {by} | " + " | ".join(str(h) for h in holdouts) + " | mean of common cells |"]
    lines.append("|" + "---|" * (len(holdouts) + 2))
    for p in groups:
        g = d[d[by] == p]
        cells = [fmt(g[g.holdout == h][metric], digits) for h in holdouts]
        c = g[[(h, s) in common for h, s in zip(g.holdout, g.seed)]][metric]
        cells.append(f"{c.mean():.{digits}f} ({len(c)} cells)" if len(c) else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def paired(d: pd.DataFrame) -> list[str]:
    holdouts = sorted(d.holdout.unique())
    lines = ["| prior - gaussian | seed | " + " | ".join(str(h) for h in holdouts) + " | mean |"]
    lines.append("|" + "---|" * (len(holdouts) + 3))
    base = d[d.prior == "gaussian"].set_index(["seed", "holdout"]).auprc
    for p in ("joint", "layerwise"):
        other = d[d.prior == p].set_index(["seed", "holdout"]).auprc
        for seed in sorted(set(other.index.get_level_values(0))):
            if not all((seed, h) in base.index and (seed, h) in other.index for h in holdouts):
                continue
            diff = [other[seed, h] - base[seed, h] for h in holdouts]
            lines.append(f"| {p} | {seed} | " + " | ".join(f"{x:+.3f}" for x in diff) + f" | {np.mean(diff):+.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path, nargs="+")
    ap.add_argument("--z-dims", default="32,8")
    ap.add_argument("--score", default="score")
    ap.add_argument("--sample-metrics", type=Path, nargs="*", default=[])
    ap.add_argument("--seeds", default="", help="only these seeds, comma-separated (default: all found)")
    ap.add_argument("--split", default="clean", choices=["clean", "published"])
    ap.add_argument("--fid-override", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    d = load(args.csv, args.z_dims, args.score, args.split)
    for path in args.sample_metrics:
        d = fill_fid(d, path)
    for path in args.fid_override:
        d = override_fid(d, path, z_dims=args.z_dims)
    if args.seeds:
        d = d[d.seed.isin([int(t) for t in args.seeds.split(",")])]
    print(f"AUPRC ({args.score}), z_dims [{args.z_dims}], {args.split} split: mean ± std over seeds (n)\n")
    print("\n".join(table(d, "auprc", 3)))
    if args.score == "score":
        print("\nSample FID (in-project LeNet features; lower is better)\n")
        print("\n".join(table(d, "sample_fid_lenet", 1)))
        for source, g in d.groupby("fid_from"):
            print(f"- FIDs of {len(g)} cells ({', '.join(sorted(set(g.prior)))}) from {source}")
    print("\nPaired AUPRC difference against the Gaussian prior, per seed\n")
    print("\n".join(paired(d)))


if __name__ == "__main__":
    main()
