"""The held-in figures of fitted models, as training reports them each epoch (``train.validation_figures``).

    python benchmarks/held_in_figures.py MODEL_DIR [MODEL_DIR ...]

For each model (fitted on MNIST with a hold-out digit, e.g. by ``jebm-od bench``) it rebuilds the split from the
model's config and meta, and prints one line: the held-in -ELBO and the held-in reconstruction error at the
inference network's mean codes (the breakdown guard's figure), and the epochs the weights had. One thread; the
-ELBO's sampled codes and log Z draws are seeded with 0.
"""

from __future__ import annotations

import json
import sys

import torch

from outlier_jebm.checkpoint import load_model
from outlier_jebm.pipeline import prepare_data
from outlier_jebm.train import validation_figures


def main() -> None:
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        loaded = load_model(path)
        cfg, meta = loaded.config, loaded.meta
        td = prepare_data(
            "mnist", holdout=meta.get("holdout"), seed=cfg.train.seed, val_fraction=cfg.train.val_fraction
        )
        x = loaded.model.to_model_space(td.val, "cpu")
        torch.manual_seed(0)
        figures = {k: round(v, 2) for k, v in validation_figures(loaded.model, x).items()}
        print(path.rstrip("/").split("/")[-1], json.dumps(figures), "epochs", meta.get("epochs_done"))


if __name__ == "__main__":
    main()
