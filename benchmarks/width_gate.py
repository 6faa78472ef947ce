"""The default score with a one-sided posterior-width term, on the same fitted model.

    python benchmarks/width_gate.py --model DIR --out width_gate.csv [--label default]

The inference network's posterior width w(x) = sum over all latent dimensions of log sigma of q(z | x), along its
mean path (the product's ``posterior_width`` component), is wide where the network cannot place an input precisely: a held-out digit
1 (thin, little ink). Added to the default score as a robust z-score it lifts digit 1 and costs the classes whose
widths are ordinary (2026-11-24, 2026-12-02 in RESULTS.md). The candidate adds it one-sided, only past a margin:

    score_tau = mean(z(latent_knn_cos), z(latent_knn)) + max(z(w) - tau, 0),

each z the robust z-score (median, MAD) on the model's held-in part, as the default's (the library's
``Calibration.margins``, ``score.width_margin``). Appends one CSV row per model
with the AUPRC of the model's own default score, of the pair alone (no one-sided term), of w alone and of each
candidate, and the wiring check ``max_abs_diff_default`` (the default score rebuilt here, with the model's own
one-sided terms, against the model's own; for a model fitted before ``score.width_margin`` the pair is its default).
No test label enters any score.
"""

from __future__ import annotations

import time

import numpy as np
from model_on_split import ID_FIELDS, append_row, load_on_split, model_args, row_id

TAUS = (1, 2, 3)


def fields() -> list[str]:
    return [
        *ID_FIELDS,
        "auprc_default",
        "auprc_pair",
        "auprc_posterior_width",
        *[f"auprc_gate_{tau}" for tau in TAUS],
        "max_abs_diff_default",
        "n_test",
        "seconds",
    ]


def main() -> None:
    args = model_args(__doc__)

    from outlier_jebm.calibration import fit_calibration
    from outlier_jebm.evaluate import detection_metrics

    t0 = time.perf_counter()
    m = load_on_split(args.model)
    cal = m.scorer.calibration
    # the product's components, ``posterior_width`` among them
    comps = {
        name: m.scorer.components_of(images).components for name, images in (("val", m.td.val), ("test", m.td.test))
    }

    def candidate(margins: dict[str, float]) -> np.ndarray:
        """The pair's score plus ``margins``' one-sided terms, fitted on the held-in part as the default's is."""
        fitted = fit_calibration(
            comps["val"],
            combine=("latent_knn_cos", "latent_knn"),
            margins=margins,
            false_alarm_rate=cal.false_alarm_rate,
            score_steps=cal.score_steps,
        )
        return fitted.score(comps["test"])

    def auprc(score: np.ndarray) -> float:
        return detection_metrics(m.y, score)["auprc"]

    row = {
        **row_id(args.label, args.model, m),
        "auprc_default": auprc(cal.score(comps["test"])),
        "auprc_pair": auprc(candidate({})),
        "auprc_posterior_width": auprc(comps["test"]["posterior_width"]),
        # the wiring check: the pair's z-scores and the model's own one-sided terms, rebuilt here, give its default score
        "max_abs_diff_default": float(np.abs(candidate(dict(cal.margins)) - cal.score(comps["test"])).max()),
        "n_test": len(m.y),
    }
    for tau in TAUS:
        row[f"auprc_gate_{tau}"] = auprc(candidate({"posterior_width": tau}))
    row["seconds"] = time.perf_counter() - t0
    print(
        f"holdout {row['holdout']} seed {row['seed']} {args.model.name}: default {row['auprc_default']:.4f}, "
        f"pair {row['auprc_pair']:.4f}, "
        f"width {row['auprc_posterior_width']:.4f}, "
        + ", ".join(f"gate {tau} {row[f'auprc_gate_{tau}']:.4f}" for tau in TAUS)
        + f" (default rebuilt within {row['max_abs_diff_default']:.1e})",
        flush=True,
    )
    append_row(args.out, fields(), row)


if __name__ == "__main__":
    main()
