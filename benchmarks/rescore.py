"""Re-score models fitted by `jebm-od bench` with other score settings, without refitting.

    python benchmarks/rescore.py --bench-dir BENCH_OUT [--set score.llr_samples=8] [--combine a+b,c+0.5*d,a+b|c]
                                 [--reference-size N] [--holdout 1,4] [--seeds 0]
                                 [--out rescore.csv]

For every model ``BENCH_OUT/models/<variant>-holdout<D>-seed<S>`` (``jebm``, ``jebm_prior_gaussian``, ...) it rebuilds the same split
(``prepare_data(mnist, holdout=D, seed=S)``, as the bench did), scores the test part with the
model's score settings plus ``--set`` overrides, and reports AUPRC/AUROC per component and
per combination. A combination is calibrated exactly like the default score (robust z-scores
fitted on the held-in validation part, never on test labels), so its figure is what the
model would give with ``calibration.combine`` set to it (``0.5*d``: the weight of d in the mean).
``a+b|c`` is the larger of two such scores, each calibrated on its own (``|`` separates the groups).
Prints one line per model and score and writes ``--out`` CSV (one row per model and score).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_set(items: list[str]) -> dict:
    import yaml

    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section != "score" or not name or not _:
            raise SystemExit(f"--set {item!r}: expected score.KEY=VALUE")
        out[name] = yaml.safe_load(value)
    return out


def parse_combination(text: str) -> tuple[list[str], dict[str, float]]:
    """``a+b+0.25*c`` -> (components, weights); a component without a factor weighs 1."""
    names, weights = [], {}
    for term in text.split("+"):
        factor, star, name = term.rpartition("*")
        names.append(name)
        if star:
            weights[name] = float(factor)
    return names, weights


def parse_groups(text: str) -> list[tuple[list[str], dict[str, float]]]:
    """``a+b|c`` -> one (components, weights) per group; the score is the largest group score."""
    return [parse_combination(group) for group in text.split("|")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], help="score.KEY=VALUE override (repeatable)")
    ap.add_argument(
        "--combine",
        default="",
        help="comma-separated combinations: components joined by +, groups (the larger score) by |",
    )
    ap.add_argument("--holdout", default="", help="only these held-out digits (default: every model found)")
    ap.add_argument("--seeds", default="", help="only these seeds (default: every model found)")
    ap.add_argument(
        "--reference-size",
        type=int,
        default=None,
        help="rebuild the kNN reference from this many training images (0 = all) instead of the stored one",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.evaluate import detection_metrics
    from outlier_jebm.pipeline import prepare_data
    from outlier_jebm.scoring import Scorer, fit_calibration, reference_latents, reference_set

    overrides = parse_set(args.set)
    settings = dict(overrides) | ({} if args.reference_size is None else {"reference_size": args.reference_size})
    combos = {c: parse_groups(c) for c in args.combine.split(",") if c}
    only = {int(d) for d in args.holdout.split(",") if d}
    only_seeds = {int(s) for s in args.seeds.split(",") if s}
    rows = []
    for model_dir in sorted((args.bench_dir / "models").glob("*-holdout*-seed*")):
        m = re.match(r"(.+)-holdout(\d+)-seed(\d+)$", model_dir.name)
        if not m or not (model_dir / "calibration.json").is_file():
            continue
        variant, holdout, seed = m.group(1), int(m.group(2)), int(m.group(3))
        if (only and holdout not in only) or (only_seeds and seed not in only_seeds):
            continue
        loaded = load_model(model_dir)
        cfg = loaded.config.with_overrides(score=overrides) if overrides else loaded.config
        loaded.config = cfg
        td = prepare_data(
            "mnist",
            holdout=holdout,
            seed=seed,
            val_fraction=cfg.train.val_fraction,
            max_train=cfg.train.max_train,
            image_size=cfg.model.image_size,
        )
        scorer = Scorer(loaded)
        if args.reference_size is not None:  # drawn like calibrate() draws it; the model dir is not touched
            ref = reference_latents(scorer, td.train, args.reference_size, seed=cfg.train.seed)
            scorer.reference = reference_set(scorer.model, torch.from_numpy(ref), top_knn=cfg.score.top_knn)
        test = scorer.components_of(td.test).components
        val = scorer.components_of(td.val).components
        y = td.test_is_anomaly
        scores = {f"[{k}]": v for k, v in test.items() if np.ptp(v) > 0}
        scores["default (" + "+".join(scorer.calibration.combine) + ")"] = scorer.calibration.score(test)
        for name, groups in combos.items():
            group_scores = [
                fit_calibration(
                    val,
                    combine=combo,
                    weights=weights,
                    false_alarm_rate=cfg.score.false_alarm_rate,
                    score_steps=cfg.score.steps,
                ).score(test)
                for combo, weights in groups
            ]
            scores[name] = np.max(group_scores, axis=0)
        for name, values in scores.items():
            met = detection_metrics(y, values)
            rows.append(
                {
                    "model": variant,
                    "holdout": holdout,
                    "seed": seed,
                    "score": name,
                    "auprc": met["auprc"],
                    "auroc": met["auroc"],
                    "settings": str(settings or ""),
                }
            )
            print(
                f"{variant} holdout {holdout} seed {seed}  {name:45s} AUPRC {met['auprc']:.3f}  AUROC {met['auroc']:.3f}",
                flush=True,
            )
    if args.out and rows:
        with args.out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
