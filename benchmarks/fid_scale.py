"""What FID (in-project LeNet features) values mean: real image sets against the training part.

    python benchmarks/fid_scale.py [--holdout 1] [--seed 0] [--n 10000]

Trains (or loads from the cache) the LeNet of ``outlier_jebm.sample_quality`` on the split's
training part, exactly as ``fit`` and ``bench`` do, and prints the Fréchet distance between
``--n`` training images and: held-in validation images, the test part's normals, images of the
held-out digit, and uniform noise; plus the LeNet's mean confidence on each. A model's prior
samples land somewhere on this scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--holdout", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()

    from outlier_jebm.pipeline import prepare_data
    from outlier_jebm.sample_quality import frechet_distance, train_classifier

    td = prepare_data("mnist", holdout=args.holdout, seed=args.seed, val_fraction=0.05)
    clf = train_classifier(td.train, td.train_labels, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    train = td.train[rng.permutation(len(td.train))[: args.n]]
    ref, _ = clf.features_and_confidence(train)
    normals = td.test[td.test_is_anomaly == 0][: args.n]
    held_out = td.test[td.test_is_anomaly == 1][: args.n]
    noise = rng.random((min(args.n, 5000), *td.train.shape[1:]), dtype=np.float32)
    print(
        f"holdout {args.holdout} seed {args.seed}: LeNet accuracy {clf.accuracy:.4f} on training images it did not fit"
    )
    print("| image set | n | FID (in-project LeNet features) | LeNet mean confidence |")
    print("| --- | --- | --- | --- |")
    for name, images in [
        ("held-in validation images", td.val),
        ("test normals (held-in digits, not trained on)", normals),
        (f"held-out digit {args.holdout}", held_out),
        ("uniform noise", noise),
    ]:
        feats, conf = clf.features_and_confidence(images)
        print(f"| {name} | {len(images)} | {frechet_distance(feats, ref):.3f} | {conf.mean():.3f} |")


if __name__ == "__main__":
    main()
