"""The complexity-corrected likelihood (Serra et al. 2020) added to the default score, on bench models.

    python benchmarks/complexity.py MODEL_DIR [MODEL_DIR ...] [--cache DIR]

Each MODEL_DIR is ``<bench out>/models/<variant>-holdout<D>-seed<S>`` of an MNIST bench with the
default data location. The split is rebuilt as the bench made it; the kNN reference holds every training image (as ``calibrate`` draws it with
``reference_size=0``). Per model it prints AUPRC of the default score and of

    C = mean robust z of (latent_knn_cos, latent_knn, serra),
    serra = neg_log_joint / ln 2 - complexity,

where complexity is the length in bits of the 8-bit image compressed by zlib at level 9. Both
scores are calibrated by ``fit_calibration`` on the held-in validation part only, as a model is. Components are
cached per model in ``--cache`` (npz), so a second run only evaluates.
"""

from __future__ import annotations

import argparse
import re
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def complexity_bits(images: np.ndarray) -> np.ndarray:
    q = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    return np.array([8 * len(zlib.compress(im.tobytes(), 9)) for im in q], dtype=np.float64)


def components(model_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    import torch

    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.knn import References
    from outlier_jebm.pipeline import prepare_data
    from outlier_jebm.scoring import Scorer, reference_latents

    m = re.match(r"(.+)-holdout(\d+)-seed(\d+)$", model_dir.name)
    if not m:
        raise SystemExit(f"{model_dir}: expected <variant>-holdout<D>-seed<S>")
    bench = model_dir.resolve().parent.parent.name  # two bench folders may hold models of the same name
    out = cache / f"{bench}-{m.group(1)}-h{m.group(2)}-s{m.group(3)}.npz"
    if out.is_file():
        return dict(np.load(out))
    loaded = load_model(model_dir)
    cfg = loaded.config
    td = prepare_data(
        "mnist",
        holdout=int(m.group(2)),
        seed=int(m.group(3)),
        val_fraction=cfg.train.val_fraction,
        max_train=cfg.train.max_train,
        image_size=cfg.model.image_size,
    )
    scorer = Scorer(loaded)
    scorer.reference = References(torch.from_numpy(reference_latents(scorer, td.train, 0, seed=cfg.train.seed)))
    arrays = {f"test_{k}": v for k, v in scorer.components_of(td.test).components.items()}
    arrays |= {f"val_{k}": v for k, v in scorer.components_of(td.val).components.items()}
    arrays["test_cx"], arrays["val_cx"] = complexity_bits(td.test), complexity_bits(td.val)
    arrays["y"] = td.test_is_anomaly.astype(np.int8)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("complexity-cache"))
    args = ap.parse_args()
    from outlier_jebm.calibration import fit_calibration
    from outlier_jebm.evaluate import detection_metrics
    from outlier_jebm.scoring import DEFAULT_COMBINATION

    print("| model | default | C (default + serra) | difference |\n|---|---|---|---|")
    for model_dir in args.models:
        a = components(model_dir, args.cache)
        parts = {part: {k: a[f"{part}_{k}"] for k in DEFAULT_COMBINATION} for part in ("val", "test")}
        for part, c in parts.items():
            c["serra"] = a[f"{part}_neg_log_joint"] / np.log(2) - a[f"{part}_cx"]
        auprc = {}
        for name, combine in (("default", DEFAULT_COMBINATION), ("corrected", (*DEFAULT_COMBINATION, "serra"))):
            cal = fit_calibration(parts["val"], combine=combine, false_alarm_rate=0.05, score_steps=0)
            auprc[name] = detection_metrics(a["y"], cal.score(parts["test"]))["auprc"]
        default, corrected = auprc["default"], auprc["corrected"]
        print(f"| {model_dir.name} | {default:.3f} | {corrected:.3f} | {corrected - default:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
