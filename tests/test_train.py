import itertools
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from outlier_jebm.checkpoint import load_model
from outlier_jebm.config import ConfigError
from outlier_jebm.model import JointEBM
from outlier_jebm.train import (
    BestEpoch,
    TrainingDiverged,
    chain_diagnostics,
    fit,
    loss_terms,
    make_optimizer,
    steps_per_epoch,
    to_model_space,
)

COMBOS = list(itertools.product(["chain", "ladder"], ["gaussian", "layerwise", "joint"], ["variational", "mle"]))


@pytest.mark.parametrize("generator,prior,scheme", COMBOS)
def test_every_variant_trains_on_digits_without_nan_and_lowers_its_loss(digits01, generator, prior, scheme):
    images, _ = digits01
    cfg = tiny_config(generator, prior, scheme)
    torch.manual_seed(0)
    model = JointEBM(cfg.model).train()
    opt = make_optimizer(model, cfg)
    x = to_model_space(images)
    recon = []
    for step in range(80):
        xb = x[torch.randint(0, len(x), (64,))]
        loss, stats = loss_terms(model, xb, cfg)
        assert torch.isfinite(loss), f"step {step}: {stats}"
        opt.zero_grad()
        loss.backward()
        opt.step()
        recon.append(stats["recon"].item())
    # the likelihood part of the loss (the EBM's contrastive part is not a likelihood)
    assert np.mean(recon[-10:]) < 0.7 * np.mean(recon[:10])


def test_a_training_step_raises_f_on_posterior_samples_relative_to_prior_samples(digits01):
    # sign convention in training: the EBM gradient is E_post[grad f] - E_prior[grad f], ascended
    images, _ = digits01
    cfg = tiny_config("chain", "joint", ebm_l2=0.0)
    model = JointEBM(cfg.model).train()
    x = to_model_space(images[:256])
    ebm_opt = torch.optim.SGD(model.ebm.parameters(), lr=0.05)
    gaps = []
    for _ in range(6):
        torch.manual_seed(123)
        loss, stats = loss_terms(model, x, cfg)
        gaps.append(stats["f_gap"].item())
        ebm_opt.zero_grad()
        loss.backward()
        ebm_opt.step()
    assert all(b > a for a, b in zip(gaps, gaps[1:])), gaps


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_same_seed_gives_the_same_model(digits01, tmp_path):
    images, _ = digits01
    cfg = tiny_config()
    states = []
    for run in range(2):
        torch.manual_seed(7)
        model = JointEBM(cfg.model)
        fit(model, cfg, images[:512], images[512:600], tmp_path / f"run{run}")
        states.append(_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("scheme", ["variational", "mle"])
def test_the_chain_diagnostic_reads_each_training_chain_and_changes_nothing(digits01, tmp_path, scheme, monkeypatch):
    images, _ = digits01
    cfg = tiny_config(scheme=scheme, epochs=2).with_overrides(model={"ebm_spectral_norm": True})
    torch.manual_seed(0)
    model = JointEBM(cfg.model).train()
    x = to_model_space(images[:100])
    opt = make_optimizer(model, cfg)
    for _ in range(3):  # weights that moved since the spectral norm's vectors last converged
        opt.zero_grad()
        loss_terms(model, x, cfg)[0].backward()
        opt.step()
    state, rng = _state(model), torch.get_rng_state()
    chains = chain_diagnostics(model, cfg, x)
    # nothing the training reads next has moved: weights, spectral-norm vectors, random state, mode
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    expected = {"prior_chain": 10} | ({"posterior_chain": 5} if scheme == "mle" else {})
    assert {k: len(v) for k, v in chains.items()} == {k: steps + 1 for k, steps in expected.items()}
    assert all(np.isfinite(v).all() for v in chains.values())

    # a fit with the diagnostic trains exactly as one without it, and reports both ends of each chain per epoch
    states, results = [], []
    for run, diagnose in enumerate((True, False)):
        if not diagnose:
            monkeypatch.setattr("outlier_jebm.train.chain_diagnostics", lambda *a, **k: {})
        torch.manual_seed(7)
        m = JointEBM(cfg.model)
        results.append(fit(m, cfg, images[:512], images[512:600], tmp_path / f"run{run}"))
        states.append(_state(m))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with_chains = results[0]
    assert set(with_chains.chains) == set(expected)
    for name in expected:
        for epoch in with_chains.history:
            assert np.isfinite(epoch[f"{name}_log_density_start"]) and np.isfinite(epoch[f"{name}_log_density_end"])
        assert with_chains.history[-1][f"{name}_log_density_end"] == with_chains.chains[name][-1]


def test_a_checkpoint_round_trip_gives_identical_outputs(digits01, tmp_path):
    images, _ = digits01
    cfg = tiny_config("ladder", "layerwise")
    model = JointEBM(cfg.model)
    fit(model, cfg, images[:512], None, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = to_model_space(images[600:700])
    z = torch.randn(100, model.z_dim)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.log_joint(x, z), loaded.model.log_joint(x, z))
        assert torch.equal(model.encoder(x, sample=False)[0], loaded.model.encoder(x, sample=False)[0])
    assert loaded.config == cfg
    assert not any(p.suffix in {".pt", ".pkl", ".pth"} for p in (tmp_path / "m").iterdir())


def _after_one_good_epoch(images, tmp_path):
    """A model fitted for one epoch into tmp_path/m: (model, config, model dir, the weights' bytes)."""
    cfg = tiny_config(epochs=1)
    model = JointEBM(cfg.model)
    out = tmp_path / "m"
    fit(model, cfg, images, None, out)
    return model, cfg, out, (out / "weights.safetensors").read_bytes()


@pytest.mark.parametrize("cause", ["nan", "runaway"])
def test_a_diverging_step_stops_training_with_a_message_and_keeps_the_last_good_checkpoint(digits01, tmp_path, cause):
    images = digits01[0][:512]
    model, cfg, out, good = _after_one_good_epoch(images, tmp_path)
    if cause == "nan":
        images = images.copy()
        images[100, 3, 3] = np.nan
        cfg2 = cfg.with_overrides(train={"epochs": 2})
        message = r"non-finite loss at epoch 2, step \d+.*last good checkpoint \(epoch 1\)"
    else:  # every real loss is far beyond 1e-6: the first step of epoch 2 counts as a runaway
        cfg2 = cfg.with_overrides(train={"epochs": 2, "max_abs_loss": 1e-6})
        message = r"runaway loss .* train.max_abs_loss = 1e-06\) at epoch 2, step 1 .*last good checkpoint \(epoch 1\)"
    with pytest.raises(TrainingDiverged, match=message):
        fit(model, cfg2, images, None, out, resume=True)
    assert (out / "weights.safetensors").read_bytes() == good
    assert load_model(out).meta["epochs_done"] == 1


def _fit_with_a_breakdown(images, out, max_recon_rise):
    """Four epochs; the generator's weights are wrecked at the first step of epoch 3, as a fit that breaks down.

    Returns the fit's result and every epoch's weights as they were at its end.
    """
    cfg = tiny_config(epochs=4, max_recon_rise=max_recon_rise)
    torch.manual_seed(0)
    model = JointEBM(cfg.model)
    ends = {}

    def wreck(epoch, step, stats):
        if epoch == 2 and step == 0:
            with torch.no_grad():
                for p in model.generator.parameters():
                    p.add_(0.5 * torch.randn_like(p))

    def snapshot(epoch, metrics, m):
        ends[epoch + 1] = _state(m)

    result = fit(model, cfg, images[:512], images[512:640], out, on_step=wreck, on_epoch=snapshot)
    return model, result, ends


def test_a_fit_that_breaks_down_stops_and_keeps_its_best_epoch(digits01, tmp_path):
    out = tmp_path / "m"
    model, result, ends = _fit_with_a_breakdown(digits01[0], out, max_recon_rise=0.02)
    vals = [h["val_recon"] for h in result.history]
    assert len(vals) == 3  # epoch 3 was trained and measured, epoch 4 never ran
    kept = int(np.argmin(vals[:2])) + 1
    assert vals[2] - vals[kept - 1] > 0.02 * 64
    assert result.epochs_done == kept
    assert "at epoch 3" in result.stopped and f"keeping epoch {kept}'s weights" in result.stopped
    loaded = load_model(out)
    assert loaded.meta["epochs_done"] == kept and loaded.meta["stopped_early"] == result.stopped
    for state in (loaded.model.state_dict(), model.state_dict()):  # on disk and in memory
        assert all(torch.equal(state[k], ends[kept][k]) for k in state)
    progress = json.loads((out / "train_state.json").read_text())
    assert progress["epoch"] == kept and progress["best_epoch"] == kept - 1


def test_a_fit_resumed_after_a_stop_starts_from_the_kept_epoch_and_still_knows_its_figure(
    digits01, tmp_path, monkeypatch
):
    out = tmp_path / "m"
    _, result, ends = _fit_with_a_breakdown(digits01[0], out, max_recon_rise=0.02)
    kept = result.epochs_done
    best_value = json.loads((out / "train_state.json").read_text())["best_value"]
    loaded = load_model(out)
    seen = []
    real = BestEpoch.check

    def spy(self, epoch, value, *args):
        seen.append((epoch, self.epoch, self.value))
        return real(self, epoch, value, *args)

    monkeypatch.setattr(BestEpoch, "check", spy)
    cfg = loaded.config.with_overrides(train={"epochs": kept + 1})
    fit(loaded.model, cfg, digits01[0][:512], digits01[0][512:640], out, resume=True)
    # the first check seeds the guard with the checkpoint; the trained epoch is then judged against it
    assert seen[0] == (kept - 1, -1, float("inf")) and seen[1] == (kept, kept - 1, best_value)


def test_with_the_guard_off_a_breakdown_trains_to_the_end(digits01, tmp_path):
    model, result, ends = _fit_with_a_breakdown(digits01[0], tmp_path / "m", max_recon_rise=0)
    assert len(result.history) == 4 and result.epochs_done == 4 and result.stopped == ""
    state = load_model(tmp_path / "m").model.state_dict()
    assert all(torch.equal(state[k], ends[4][k]) for k in state)


def test_the_guard_keeps_the_best_epoch_and_stops_past_its_margin():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    best = BestEpoch(max_rise_per_dim=0.5, data_dim=4)  # margin: 2 nats

    def adam_step():
        opt.zero_grad()
        model(torch.ones(3, 2)).sum().backward()
        opt.step()

    adam_step()
    assert best.check(0, 10.0, model, opt, 5) == ""
    kept = _state(model)
    kept_moment = opt.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert best.check(1, 11.9, model, opt, 10) == ""  # within the margin: go on, epoch 1 stays the best
    assert best.check(2, 9.5, model, opt, 15) == "" and best.epoch == 2  # a new best
    assert best.check(3, 11.4, model, opt, 20) == ""
    assert "epoch 5, +2.1 above epoch 3's 9.5" in best.check(4, 11.6, model, opt, 25)
    assert best.check(4, float("nan"), model, opt, 25) == (  # NaN counts as a breakdown
        "held-in reconstruction error not finite at epoch 5 (epoch 3's: 9.5); stopped, keeping epoch 3's weights"
    )
    epoch3 = _state(model)
    adam_step()
    assert not torch.equal(opt.state_dict()["state"][0]["exp_avg"], kept_moment)
    best.restore(model, opt)
    assert best.global_step == 15
    assert torch.equal(model.weight, epoch3["weight"]) and torch.equal(model.weight, kept["weight"] + 1.0)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], kept_moment)  # no Adam step since epoch 1


def test_the_guard_is_on_for_mle_images_and_off_otherwise_unless_set():
    from outlier_jebm.config import for_vectors

    assert tiny_config(scheme="mle").recon_rise_guard == 0.02
    assert tiny_config(scheme="variational").recon_rise_guard == 0.0
    assert for_vectors(tiny_config(scheme="mle"), 6).recon_rise_guard == 0.0
    assert tiny_config(scheme="variational", max_recon_rise=0.05).recon_rise_guard == 0.05
    assert tiny_config(scheme="mle", max_recon_rise=0).recon_rise_guard == 0.0
    with pytest.raises(ConfigError, match="max_recon_rise"):
        tiny_config(max_recon_rise=-1)


def test_max_abs_loss_must_be_positive():
    with pytest.raises(ConfigError, match="max_abs_loss"):
        tiny_config().with_overrides(train={"max_abs_loss": 0})


def test_resume_continues_from_the_last_epoch(digits01, tmp_path):
    images, _ = digits01
    cfg = tiny_config(epochs=1)
    out = tmp_path / "m"
    fit(JointEBM(cfg.model), cfg, images[:256], None, out)
    cfg2 = cfg.with_overrides(train={"epochs": 3})
    result = fit(load_model(out).model, cfg2, images[:256], None, out, resume=True)
    assert len(result.history) == 2
    assert load_model(out).meta["epochs_done"] == 3


def test_train_threads_apply_while_training_and_are_restored_after(digits01, tmp_path, monkeypatch):
    import outlier_jebm.train as train_module

    images, _ = digits01
    seen = []
    real = train_module._fit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_fit", spy)
    before = torch.get_num_threads()
    cfg = tiny_config(threads=1)
    fit(JointEBM(cfg.model), cfg, images[:128], images[128:160], tmp_path / "m")
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="train.threads"):
        tiny_config(threads=-1)


def test_min_steps_raise_the_epochs_of_a_small_data_set_only():
    from outlier_jebm.train import planned_epochs

    cfg = tiny_config(epochs=2, min_steps=100, batch_size=50)
    assert planned_epochs(cfg, 500) == 10  # 10 steps an epoch
    assert planned_epochs(cfg, 50_000) == 2  # 1 000 steps an epoch: the epochs stand


def test_random_shifts_move_each_image_by_its_own_offset_and_repeat_the_edge():
    from outlier_jebm.shifts import random_shifts

    torch.manual_seed(0)
    img = torch.rand(300, 5, 6, 3)  # (B, H, W, C): the channel order must survive the move
    moved = random_shifts(img.reshape(300, -1), (5, 6, 3), 1).view(300, 5, 6, 3)
    padded = torch.from_numpy(np.pad(img.numpy(), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"))  # edges repeated
    offsets = []
    for i in range(300):
        found = [
            (dy, dx) for dy in range(3) for dx in range(3) if torch.equal(moved[i], padded[i, dy : dy + 5, dx : dx + 6])
        ]
        assert found, f"image {i} is not itself moved by at most one pixel"
        offsets.append(found[0])
    assert set(offsets) == set(itertools.product(range(3), range(3)))  # the unmoved image and the diagonals too


def test_train_shifts_train_on_what_the_moves_return_and_the_same_seed_still_gives_the_same_model(
    digits01, tmp_path, monkeypatch
):
    import outlier_jebm.train as train_module

    images, _ = digits01
    calls, real = [], train_module.random_shifts

    def fit_with(shifts, move):
        def spy(x, shape, pixels):
            calls.append((tuple(shape), pixels))
            return move(x, shape, pixels)

        monkeypatch.setattr(train_module, "random_shifts", spy)
        cfg = tiny_config(shifts=shifts)
        torch.manual_seed(7)
        model = JointEBM(cfg.model)
        fit(model, cfg, images[:512], images[512:600], tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        return _state(model)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    plain = fit_with(0, real)
    assert calls == []
    unmoved = fit_with(1, lambda x, shape, pixels: x)  # a move that changes nothing trains the plain model
    assert calls == [((8, 8), 1)] * steps_per_epoch(512, 64)  # once per batch
    flipped = fit_with(1, lambda x, shape, pixels: x.flip(1))  # the batch trained on is the one the move returns
    assert same(plain, unmoved) and not same(plain, flipped)
    assert same(fit_with(1, real), fit_with(1, real)) and not same(fit_with(1, real), plain)


def test_train_shifts_are_whole_pixels_under_half_the_image_and_for_images_only():
    for bad in (-1, True, 4):  # 8-pixel images: 4 is half their size
        with pytest.raises(ConfigError, match="train.shifts"):
            tiny_config(shifts=bad)
    with pytest.raises(ConfigError, match="train.shifts is for images"):
        tiny_config().with_overrides(model={"data_kind": "vector", "vector_dim": 5}, train={"shifts": 1})
