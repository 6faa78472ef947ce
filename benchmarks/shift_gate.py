"""The default score with test-time shifts (``score.shifts``), on the same fitted model.

    python benchmarks/shift_gate.py --model DIR --out shift_gate.csv [--label default] [--shifts 1]

With ``score.shifts`` s, each latent kNN distance (``latent_knn``, ``latent_knn_cos``) is the smallest over the image
and its copies moved by s pixels up, down, left and right (the library's ``shifts.shifted_copies``); the other
components read the image as given. The candidate is the model's own combination and one-sided terms, refitted on
the model's held-in part with the shifted components, as ``calibrate`` would fit them for a model whose config sets
``score.shifts``. Appends one CSV row per model: the AUPRC of the model's own default score and of the candidate, of
each kNN component with and without shifts, the wiring check ``max_abs_diff_default`` (the default score refitted
here from unshifted components against the model's own) and the seconds each scoring pass took (one process, not a
speed benchmark). No test label enters any score.
"""

from __future__ import annotations

import copy
import time

from model_on_split import ID_FIELDS, append_row, load_on_split, model_args, row_id

KNN = ("latent_knn", "latent_knn_cos")


def fields() -> list[str]:
    return [
        *ID_FIELDS,
        "shifts",
        "auprc_default",
        "auprc_shifted",
        *[f"auprc_{k}" for k in KNN],
        *[f"auprc_{k}_shifted" for k in KNN],
        "max_abs_diff_default",
        "seconds_plain",
        "seconds_shifted",
        "n_test",
    ]


def main() -> None:
    args = model_args(__doc__, shifts={"type": int, "default": 1})

    import numpy as np

    from outlier_jebm.calibration import fit_calibration
    from outlier_jebm.evaluate import detection_metrics
    from outlier_jebm.scoring import Scorer

    model_dir = args.model
    m = load_on_split(model_dir)
    cal = m.scorer.calibration
    moved = copy.copy(m.loaded)
    moved.config = m.loaded.config.with_overrides(score={"shifts": args.shifts})
    scorers = {"plain": m.scorer, "shifted": Scorer(moved, device="cpu")}
    comps, seconds = {}, {}
    for kind, scorer in scorers.items():
        t0 = time.perf_counter()
        comps[kind] = {
            part: scorer.components_of(images).components for part, images in (("val", m.td.val), ("test", m.td.test))
        }
        seconds[kind] = time.perf_counter() - t0

    def refit(kind: str) -> np.ndarray:
        """The model's own combination and one-sided terms, fitted on the held-in part's ``kind`` components."""
        fitted = fit_calibration(
            comps[kind]["val"],
            combine=cal.combine,
            weights=dict(cal.weights),
            margins=dict(cal.margins),
            false_alarm_rate=cal.false_alarm_rate,
            score_steps=cal.score_steps,
        )
        return fitted.score(comps[kind]["test"])

    def auprc(score: np.ndarray) -> float:
        return detection_metrics(m.y, score)["auprc"]

    row = {
        **row_id(args.label, model_dir, m),
        "shifts": args.shifts,
        "auprc_default": auprc(cal.score(comps["plain"]["test"])),
        "auprc_shifted": auprc(refit("shifted")),
        "max_abs_diff_default": float(np.abs(refit("plain") - cal.score(comps["plain"]["test"])).max()),
        "seconds_plain": seconds["plain"],
        "seconds_shifted": seconds["shifted"],
        "n_test": len(m.y),
    }
    for k in KNN:
        row[f"auprc_{k}"] = auprc(comps["plain"]["test"][k])
        row[f"auprc_{k}_shifted"] = auprc(comps["shifted"]["test"][k])
    print(
        f"holdout {row['holdout']} seed {row['seed']} {model_dir.name}: default {row['auprc_default']:.4f}, "
        f"shifted {row['auprc_shifted']:.4f} (default rebuilt within {row['max_abs_diff_default']:.1e}; "
        f"{seconds['plain']:.0f} s / {seconds['shifted']:.0f} s)",
        flush=True,
    )
    append_row(args.out, fields(), row)


if __name__ == "__main__":
    main()
