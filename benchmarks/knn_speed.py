"""latent_knn and latent_knn_cos: three searches in one run, interleaved.

    python benchmarks/knn_speed.py --model DIR [--n 10000] [--repeats 6] [--batch-size N]

- plain: ``cdist``, then top-k over every row, once per component;
- torch: the torch search of ``knn.nearest_columns`` (one product, block selection);
- fused: the fused kernel of ``outlier_jebm.native`` (what scoring uses where it builds).

Scores n MNIST images with the model (K = 0) once per search and repeat, and prints images/s
(median and best) and the ratios of medians. All must give the same latent_knn and
latent_knn_cos on inputs that are not in the reference set.
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

import outlier_jebm.knn as knn
import outlier_jebm.scoring as scoring
from outlier_jebm import native
from outlier_jebm.checkpoint import load_model
from outlier_jebm.data import load_dataset


def plain_knn(eps: torch.Tensor, reference: knn.Reference, k: int = knn.KNN_K) -> torch.Tensor:
    near = torch.cdist(eps, reference.eps).topk(k + 1, dim=1, largest=False).values
    is_self = near[:, :1] < 1e-5
    return torch.where(is_self, near[:, 1:].mean(1, keepdim=True), near[:, :k].mean(1, keepdim=True)).squeeze(1)


def plain_pair(eps: torch.Tensor, references: knn.References, k: int = knn.KNN_K):
    return plain_knn(eps, references.points, k), plain_knn(knn.unit_rows(eps), references.directions, k)


def torch_pair(eps: torch.Tensor, references: knn.References, k: int = knn.KNN_K):
    usable = native.usable_for
    native.usable_for = lambda q: False
    try:
        return current_pair(eps, references, k)
    finally:
        native.usable_for = usable


current_pair = scoring.knn_points_and_directions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument(
        "--batch-size", type=int, default=None, help="scoring batch (default: the model's score.batch_size)"
    )
    args = ap.parse_args()
    images = load_dataset("mnist").images[-args.n :]
    scorer = scoring.Scorer(load_model(args.model), steps=0)
    if args.batch_size:
        scorer.score_cfg.batch_size = args.batch_size
    current = scoring.knn_points_and_directions
    if not native.available():
        raise SystemExit(f"the fused kernel is not available here: {native.status()}")
    searches = {"plain": plain_pair, "torch": torch_pair, "fused": current}
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
    diff = np.abs(results["plain"] - results["fused"])[:, ~in_ref]
    diff_torch = np.abs(results["torch"] - results["fused"])
    out = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "threads": torch.get_num_threads(),
        "n": len(images),
        "reference": len(scorer.reference),
        "batch_size": scorer.score_cfg.batch_size,
        "knn_search": native.status(),
        **{f"{name}_images_per_second": {"median": float(np.median(v)), "best": max(v)} for name, v in rates.items()},
        "fused_over_plain": float(np.median(rates["fused"]) / np.median(rates["plain"])),
        "fused_over_torch": float(np.median(rates["fused"]) / np.median(rates["torch"])),
        "max_abs_difference_outside_reference": float(diff.max()) if diff.size else 0.0,
        "max_abs_difference_fused_vs_torch": float(diff_torch.max()),
        "inputs_in_reference": int(in_ref.sum()),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
