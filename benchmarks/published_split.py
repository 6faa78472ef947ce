"""The published loaders' MNIST split per held-out digit: sizes, anomaly rate, and the share of test
normals that are training images (``splits.published_holdout_split``).

    python benchmarks/published_split.py
"""

from outlier_jebm.data import load_mnist
from outlier_jebm.splits import published_holdout_split


def main() -> None:
    ds = load_mnist()
    print("| digit | training part | test part | anomaly rate | test normals that are training images |")
    print("| --- | --- | --- | --- | --- |")
    for digit in range(10):
        split, leaked = published_holdout_split(ds, digit)
        print(
            f"| {digit} | {len(split.train) + len(split.val)} | {len(split.test)} | "
            f"{split.test_is_anomaly.mean():.3f} | {100 * leaked:.1f} % |"
        )


if __name__ == "__main__":
    main()
