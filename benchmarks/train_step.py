"""Median training step time of a config with overrides, one thread (what one ``bench --jobs 2`` cell gets).

    python benchmarks/train_step.py [--config configs/mnist.yaml] [--set train.prior_langevin.steps=60] [--steps 30] [--rounds 3] [--device cuda]

One step = the real training loss (``train.loss_terms``), backward and Adam (``threads.step_seconds``), on random
images. Prints one JSON line with the step times in ms. Run it under two checkouts (``PYTHONPATH``), alternately, to
compare code versions on the same config.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from threads import step_seconds

import outlier_jebm
from outlier_jebm.config import Config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mnist.yaml")
    ap.add_argument("--set", action="append", default=[], help="dotted.path=VALUE (YAML value), repeatable")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the step's tensors and model live there)")
    args = ap.parse_args()
    overrides = dict((k, yaml.safe_load(v)) for k, v in (item.split("=", 1) for item in args.set))
    cfg = Config.from_yaml(args.config).override(overrides)
    ms = [1000 * step_seconds(cfg, 1, args.steps, args.device) for _ in range(args.rounds)]
    print(
        json.dumps(
            {
                "code": str(Path(outlier_jebm.__file__).parent),
                "config": args.config,
                "device": args.device,
                "set": overrides,
                "step_ms": ms,
                "median_ms": statistics.median(ms),
            }
        )
    )


if __name__ == "__main__":
    main()
