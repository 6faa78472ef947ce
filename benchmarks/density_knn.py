"""The default score against a density-normalised latent kNN, on the same fitted model.

    python benchmarks/density_knn.py --model DIR --out density.csv [--label ensemble-m0]

On the split the model was fitted on (rebuilt from its record: a bench model of digit D and seed S is fitted on
``prepare_data(mnist, holdout=D, seed=S)`` with ``train.seed`` S; the seed column is ``train.seed``), the model's
``Scorer`` gives the codes and components of the held-in and test parts. Its reference latents (the training codes
that ``latent_knn`` searches) are searched again by brute force, in float64:

- ``latent_knn`` (points) and ``latent_knn_cos`` (unit vectors): the mean distance to the k nearest reference rows,
  which must equal the library's components (the wiring check, ``max_abs_diff_*``);
- each reference row's own radius: its mean distance to its k nearest other reference rows;
- the candidate: each kNN component divided by the mean radius of the query's k nearest rows (LOF's ratio, without
  its reachability distance), then robust z-scores fitted on the held-in part and their mean, as the default is made.

Writes one CSV row per model: AUPRC and AUROC of the default score (the model's own calibration) and the
candidate's, appending to ``--out``. No test label enters either score.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from model_on_split import ID_FIELDS, append_row, load_on_split, model_args, row_id

FIELDS = [
    *ID_FIELDS,
    "combine",
    "auprc_default",
    "auroc_default",
    "auprc_density",
    "auroc_density",
    "max_abs_diff_latent_knn",
    "max_abs_diff_latent_knn_cos",
    "n_reference",
    "n_test",
    "seconds",
]
ROWS_PER_PRODUCT = 1024


def nearest(
    queries: torch.Tensor, reference: torch.Tensor, k: int, skip_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (ascending) and indices of the k nearest reference rows of each query; with ``skip_self`` the
    queries are the reference itself and each row's own index is left out."""
    ref_sq = reference.pow(2).sum(1)
    dists, idxs = [], []
    for start in range(0, len(queries), ROWS_PER_PRODUCT):
        q = queries[start : start + ROWS_PER_PRODUCT]
        d2 = (q.pow(2).sum(1, keepdim=True) + ref_sq - 2.0 * q @ reference.T).clamp_min_(0.0)
        if skip_self:
            rows = torch.arange(len(q))
            d2[rows, start + rows] = torch.inf
        d, i = d2.topk(k, dim=1, largest=False)
        dists.append(d.sqrt())
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def main() -> None:
    args = model_args(__doc__)

    from safetensors.torch import load_file

    from outlier_jebm.calibration import fit_calibration
    from outlier_jebm.evaluate import detection_metrics
    from outlier_jebm.scoring import REFERENCE_FILE

    t0 = time.perf_counter()
    m = load_on_split(args.model)
    loaded, td, y, scorer = m.loaded, m.td, m.y, m.scorer
    cfg = loaded.config
    cal = scorer.calibration
    k = cfg.score.knn_k
    parts = {"val": scorer.components_of(td.val), "test": scorer.components_of(td.test)}
    ref = load_file(str(args.model / REFERENCE_FILE))["eps"].double()

    density: dict[str, dict[str, np.ndarray]] = {name: {} for name in parts}
    diffs = {}
    for comp, transform in (("latent_knn", lambda v: v), ("latent_knn_cos", unit)):
        r = transform(ref)
        own, _ = nearest(r, r, k, skip_self=True)
        radius = own.mean(1)
        for name, bs in parts.items():
            d, i = nearest(transform(torch.from_numpy(bs.eps).double()), r, k, skip_self=False)
            knn = d.mean(1)
            if name == "test":
                diffs[comp] = float((knn - torch.from_numpy(bs.components[comp])).abs().max())
            density[name][comp] = (knn / radius[i].mean(1)).numpy()

    default = detection_metrics(y, cal.score(parts["test"].components))
    # the candidate's calibration is fitted as the default's is, on the held-in part, with the kNN pair replaced
    candidate_cal = fit_calibration(
        {**parts["val"].components, **density["val"]},
        combine=cal.combine,
        false_alarm_rate=cal.false_alarm_rate,
        score_steps=cal.score_steps,
        weights=cal.weights,
    )
    candidate = detection_metrics(y, candidate_cal.score({**parts["test"].components, **density["test"]}))
    row = {
        **row_id(args.label, args.model, m),
        "combine": "+".join(cal.combine),
        "auprc_default": default["auprc"],
        "auroc_default": default["auroc"],
        "auprc_density": candidate["auprc"],
        "auroc_density": candidate["auroc"],
        "max_abs_diff_latent_knn": diffs["latent_knn"],
        "max_abs_diff_latent_knn_cos": diffs["latent_knn_cos"],
        "n_reference": len(ref),
        "n_test": len(y),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"holdout {loaded.meta.get('holdout')} seed {cfg.train.seed} {args.model.name}: default {default['auprc']:.4f}, "
        f"density-normalised {candidate['auprc']:.4f} (kNN wiring: {diffs['latent_knn']:.1e} / "
        f"{diffs['latent_knn_cos']:.1e})",
        flush=True,
    )
    append_row(args.out, FIELDS, row)


if __name__ == "__main__":
    main()
