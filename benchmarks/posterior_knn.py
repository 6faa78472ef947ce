"""The default score against a kNN between whole posteriors (their means and their widths), on the same fitted model.

    python benchmarks/posterior_knn.py --model DIR --out posterior_knn.csv [--label step04]

``latent_knn`` compares the means of q(z | x) alone. The inference network also gives each code's width (the
diagonal Gaussian's sigma), and a held-out class can differ there: an input the network cannot place precisely gets
a wide posterior. This compares whole posteriors: with both in the whitened coordinates eps of the Gaussian
hierarchy (a layer's sigma divided by the prior's conditional scale at the layer above's mean; the top layer's as
it is), the distance between a query and a training image is

    d^2 = ||eps - eps_r||^2 + lam^2 ||s - s_r||^2,

which at lam = 1 is the 2-Wasserstein distance between the two diagonal Gaussians; larger lam weighs the widths
more. The candidate component ``posterior_knn_<lam>`` is the mean d to the k (``score.knn_k``) nearest training
images, and the candidate score is the default's with ``latent_knn`` replaced by it: the mean robust z-score of
``latent_knn_cos`` and ``posterior_knn_<lam>``, fitted on the held-in part as the default's is.

On the split the model was fitted on (rebuilt from its record), the reference is every image of its training part,
as the model's own reference is (``n_reference`` must equal the stored reference's rows, and at lam = 0 the
distances must equal ``latent_knn``: the wiring check ``max_abs_diff_latent_knn``). Appends one CSV row per model
with the AUPRC of the default score, of each ``posterior_knn_<lam>`` alone, and of each candidate score. No test
label enters any score.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from model_on_split import ID_FIELDS, append_row, load_on_split, model_args, row_id

LAMBDAS = (4, 8, 16, 32)
ROWS_PER_PRODUCT = 256


@torch.no_grad()
def posteriors(model, images01: np.ndarray, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The means (in eps) and widths (sigma in eps units) of q(z | x), (N, Z) each."""
    gen, dims = model.generator, model.encoder.z_dims
    means, widths = [], []
    for start in range(0, len(images01), batch):
        mu, sigma = model.encoder.posterior(model.to_model_space(images01[start : start + batch], "cpu"))
        mus, sigmas = mu.split(dims, dim=-1), sigma.split(dims, dim=-1)
        top = len(mus) - 1
        scaled = [s / gen.conditional(i, mus[i + 1])[1] if i < top else s for i, s in enumerate(sigmas)]
        means.append(gen.to_eps(mu))
        widths.append(torch.cat(scaled, dim=-1))
    return torch.cat(means), torch.cat(widths)  # float32, as the library's own search


def knn_distances(
    means: torch.Tensor, widths: torch.Tensor, ref_means: torch.Tensor, ref_widths: torch.Tensor, k: int
) -> dict[float, np.ndarray]:
    """Mean distance to the k nearest reference posteriors for lam = 0 and each of ``LAMBDAS``."""
    msq, wsq = ref_means.pow(2).sum(1), ref_widths.pow(2).sum(1)
    out: dict[float, list[torch.Tensor]] = {lam: [] for lam in (0, *LAMBDAS)}
    for start in range(0, len(means), ROWS_PER_PRODUCT):
        m, w = means[start : start + ROWS_PER_PRODUCT], widths[start : start + ROWS_PER_PRODUCT]
        dm = m.pow(2).sum(1, keepdim=True) + msq - 2.0 * m @ ref_means.T
        dw = w.pow(2).sum(1, keepdim=True) + wsq - 2.0 * w @ ref_widths.T
        for lam in out:
            d2 = (dm + (lam * lam) * dw).clamp_min_(0.0)
            out[lam].append(d2.topk(k, dim=1, largest=False).values.sqrt().mean(1))
    return {lam: torch.cat(v).double().numpy() for lam, v in out.items()}


def fields() -> list[str]:
    return [
        *ID_FIELDS,
        "auprc_default",
        *[f"auprc_posterior_knn_{lam}" for lam in LAMBDAS],
        *[f"auprc_cos_posterior_knn_{lam}" for lam in LAMBDAS],
        "max_abs_diff_latent_knn",
        "n_reference",
        "n_stored_reference",
        "n_test",
        "seconds",
    ]


def main() -> None:
    args = model_args(__doc__)

    from safetensors.torch import load_file

    from outlier_jebm.calibration import fit_calibration
    from outlier_jebm.evaluate import detection_metrics
    from outlier_jebm.scoring import REFERENCE_FILE

    t0 = time.perf_counter()
    m = load_on_split(args.model)
    loaded, td, y, scorer = m.loaded, m.td, m.y, m.scorer
    model = scorer.model.eval()
    cal = scorer.calibration
    k = loaded.config.score.knn_k
    n_stored = len(load_file(str(args.model / REFERENCE_FILE))["eps"])
    ref_means, ref_widths = posteriors(model, td.train)

    comps, diff = {}, float("nan")
    for name, images in (("val", td.val), ("test", td.test)):
        c = scorer.components_of(images).components
        dists = knn_distances(*posteriors(model, images), ref_means, ref_widths, k)
        if name == "test":
            diff = float(np.abs(dists[0] - c["latent_knn"]).max())
        c.update({f"posterior_knn_{lam}": dists[lam] for lam in LAMBDAS})
        comps[name] = c

    row = {
        **row_id(args.label, args.model, m),
        "auprc_default": detection_metrics(y, cal.score(comps["test"]))["auprc"],
        "max_abs_diff_latent_knn": diff,
        "n_reference": len(ref_means),
        "n_stored_reference": n_stored,
        "n_test": len(y),
    }
    for lam in LAMBDAS:
        name = f"posterior_knn_{lam}"
        row[f"auprc_{name}"] = detection_metrics(y, comps["test"][name])["auprc"]
        # the candidate's calibration is fitted as the default's is, on the held-in part
        candidate = fit_calibration(
            comps["val"],
            combine=("latent_knn_cos", name),
            false_alarm_rate=cal.false_alarm_rate,
            score_steps=cal.score_steps,
        )
        row[f"auprc_cos_{name}"] = detection_metrics(y, candidate.score(comps["test"]))["auprc"]
    row["seconds"] = time.perf_counter() - t0
    print(
        f"holdout {row['holdout']} seed {row['seed']} {args.model.name}: default {row['auprc_default']:.4f}, "
        + ", ".join(f"cos + posterior_knn_{lam} {row[f'auprc_cos_posterior_knn_{lam}']:.4f}" for lam in LAMBDAS)
        + f" (kNN wiring: {diff:.1e})",
        flush=True,
    )
    append_row(args.out, fields(), row)


if __name__ == "__main__":
    main()
