"""latent_knn and latent_knn_cos: the current search against the plain one (cdist, then top-k over every row, once per component), one run.

    python benchmarks/knn_speed.py --model DIR [--n 10000] [--repeats 6]

Scores n MNIST images with the model (K = 0) twice per repeat, once with each kNN search,
interleaved, and prints images/s (median and best) and the ratio of medians. Both searches
must give the same latent_knn and latent_knn_cos on inputs that are not in the reference set.
The plain search is ``cdist`` as a user would call it (through a matrix product, in float32),
so the reported difference includes its own cancellation error, not only the current one's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import numpy as np
import torch

import outlier_jebm.scoring as scoring
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import load_dataset


def plain_knn(eps: torch.Tensor, reference: scoring.Reference, k: int = scoring.KNN_K) -> torch.Tensor:
    near = torch.cdist(eps, reference.eps).topk(k + 1, dim=1, largest=False).values
    is_self = near[:, :1] < 1e-5
    return torch.where(is_self, near[:, 1:].mean(1, keepdim=True), near[:, :k].mean(1, keepdim=True)).squeeze(1)


def plain_pair(eps: torch.Tensor, references: scoring.References, k: int = scoring.KNN_K):
    return plain_knn(eps, references.points, k), plain_knn(scoring.unit_rows(eps), references.directions, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    images = load_dataset("mnist").images[-args.n :]
    scorer = scoring.Scorer(load_model(args.model), steps=0)
    current = scoring.knn_points_and_directions
    searches = {"plain": plain_pair, "current": current}
    rates: dict[str, list[float]] = {name: [] for name in searches}
    results = {}
    scorer.components_of(images[:1000])
    try:
        for _ in range(args.repeats):
            for name, fn in searches.items():
                scoring.knn_points_and_directions = fn
                t = time.perf_counter()
                got = scorer.components_of(images).components
                results[name] = np.stack([got["latent_knn"], got["latent_knn_cos"]])
                rates[name].append(len(images) / (time.perf_counter() - t))
    finally:
        scoring.knn_points_and_directions = current
    # the reference holds training images; the plain search can miss a self-match by cancellation
    eps = torch.from_numpy(scorer.components_of(images).eps)
    in_ref = (torch.cdist(eps, scorer.reference.eps).min(1).values < 1e-2).numpy()
    diff = np.abs(results["plain"] - results["current"])[:, ~in_ref]
    out = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "threads": torch.get_num_threads(), "n": len(images), "reference": len(scorer.reference),
        **{f"{name}_images_per_second": {"median": float(np.median(v)), "best": max(v)} for name, v in rates.items()},
        "ratio_of_medians": float(np.median(rates["current"]) / np.median(rates["plain"])),
        "max_abs_difference_outside_reference": float(diff.max()) if diff.size else 0.0,
        "inputs_in_reference": int(in_ref.sum()),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
