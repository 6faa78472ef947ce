import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from outlier_jebm.config import Config


def pytest_configure(config):
    # the fused kNN kernel is built into a cache of this test session, not the user's ~/.cache
    # (and a read-only home cannot turn the fused path off in CI); subprocesses inherit it
    if "JEBM_OD_CACHE" not in os.environ:
        config._jebm_cache = tempfile.mkdtemp(prefix="jebm-od-kernel-")
        os.environ["JEBM_OD_CACHE"] = config._jebm_cache


def _latest_pointer(path):
    return path.read_text() if path.is_file() else None


def pytest_sessionstart(session):
    # `fit` records its model in ./models/latest, the default of score and serve: a test that fits
    # without moving to a tmp dir would point the user's (or the repository's) last model elsewhere
    session.config._latest = os.path.abspath(os.path.join("models", "latest"))
    session.config._latest_before = _latest_pointer(Path(session.config._latest))


def pytest_sessionfinish(session, exitstatus):
    path = Path(session.config._latest)
    if _latest_pointer(path) != session.config._latest_before:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nA test changed {path}: every test that fits must run in a tmp dir (monkeypatch.chdir).")


def pytest_unconfigure(config):
    cache = getattr(config, "_jebm_cache", None)
    if cache:
        os.environ.pop("JEBM_OD_CACHE", None)
        shutil.rmtree(cache, ignore_errors=True)


def tiny_config(generator="chain", prior="joint", scheme="variational", **train) -> Config:
    """A model small enough to train in a second on sklearn's 8x8 digits."""
    t = {
        "scheme": scheme,
        "epochs": 1,
        "batch_size": 64,
        "lr_ebm": 1e-3,
        "lr_gen": 2e-3,
        "lr_enc": 2e-3,
        "prior_langevin": {"steps": 10, "step_size": 0.2, "noise": True},
        "posterior_langevin": {"steps": 5, "step_size": 0.05, "noise": True},
        "sample_every": 1,
        "sample_metrics": 300,  # the fit-end FID on a few hundred prior samples
    }
    t.update(train)
    return Config.from_dict(
        {
            "model": {
                "image_size": 8,
                "generator": generator,
                "prior": prior,
                "z_dims": [6, 3],
                "gen_hidden": [48],
                "cond_hidden": 24,
                "enc_hidden": [48],
                "ebm_hidden": [32, 16],
                "obs_sigma": 0.3,
            },
            "train": t,
            "score": {"batch_size": 256},
        }
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and process groups started by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits01() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
