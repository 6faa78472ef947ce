"""What a fitted joint prior's chain does: the EBM's value and the code's size along prior Langevin, per model.

    python benchmarks/prior_diagnostics.py --models DIR [DIR ...] [--n 2000] [--steps 0,40,100] [--out CSV]

For each model (a directory written by ``jebm-od fit`` or ``jebm-od bench`` on MNIST with a held-out digit, named
``...-holdout<D>-seed<S>``): the inference network's posterior means of ``--n`` training images of its split, and
``--n`` prior samples after each number of prior Langevin steps (the model's step size and noise, seeded by the
model's ``train.seed``). Reports, for each set of codes, the mean of f(z) (the EBM's value: higher is more probable
under the prior) and the mean squared norm of the codes in reference coordinates, ||eps||^2 / dim (1 for the Gaussian
hierarchy's own samples). A chain whose samples end far above the posterior codes in f, or far from them in size,
samples somewhere the generator was not trained to draw from.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np
import torch

from outlier_jebm.checkpoint import load_model
from outlier_jebm.langevin import prior_langevin
from outlier_jebm.pipeline import prepare_data


@torch.no_grad()
def code_stats(model, z: torch.Tensor) -> tuple[float, float]:
    eps = model.generator.to_eps(z)
    return model.ebm(z).mean().item(), eps.pow(2).mean().item()


def diagnose(model_dir: Path, n: int, steps: list[int]) -> list[dict]:
    found = re.search(r"holdout(\d+)-seed(\d+)", model_dir.name)
    if found is None:
        raise SystemExit(f"{model_dir}: expected a name with holdout<D>-seed<S>")
    holdout, seed = int(found.group(1)), int(found.group(2))
    loaded = load_model(model_dir)
    model, cfg = loaded.model.eval(), loaded.config
    data = prepare_data("mnist", holdout=holdout, seed=seed, val_fraction=cfg.train.val_fraction)
    pick = np.random.default_rng(cfg.train.seed).choice(len(data.train), size=min(n, len(data.train)), replace=False)
    x = model.to_model_space(data.train[np.sort(pick)])
    with torch.no_grad():
        z_post, _ = model.encoder(x, sample=False)
    rows = [{"holdout": holdout, "seed": seed, "codes": "posterior means", "steps": ""}]
    rows[0]["f_mean"], rows[0]["eps_sq_per_dim"] = code_stats(model, z_post)
    pr = cfg.train.prior_langevin
    for k in steps:
        torch.manual_seed(cfg.train.seed)
        z, _ = prior_langevin(model, n, steps=k, step_size=pr.step_size, noise=pr.noise)
        f, e2 = code_stats(model, z)
        rows.append(
            {"holdout": holdout, "seed": seed, "codes": "prior samples", "steps": k, "f_mean": f, "eps_sq_per_dim": e2}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", default="0,40,100")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for d in args.models:
        for row in diagnose(d, args.n, steps):
            rows.append(row)
            print(
                f"digit {row['holdout']} seed {row['seed']}  {row['codes']:<16} {str(row['steps']):>4}  "
                f"f {row['f_mean']:8.3f}  ||eps||^2/dim {row['eps_sq_per_dim']:.3f}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
