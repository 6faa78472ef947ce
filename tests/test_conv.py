import itertools

import numpy as np
import pytest
import torch

from outlier_jebm.checkpoint import load_model, save_model
from outlier_jebm.config import Config, ConfigError
from outlier_jebm.model import ConvDecoder, ConvTrunk, JointEBM
from outlier_jebm.train import fit


def conv_config(image_size=28, channels=1, generator="chain", prior="joint", **train) -> Config:
    """A conv model small enough to run in well under a second on CPU."""
    t = {
        "epochs": 1,
        "batch_size": 50,
        "lr_ebm": 1e-3,
        "lr_gen": 2e-3,
        "lr_enc": 2e-3,
        "prior_langevin": {"steps": 5, "step_size": 0.2, "noise": True},
        "posterior_langevin": {"steps": 3, "step_size": 0.05, "noise": True},
        "sample_every": 1,
    }
    t.update(train)
    return Config.from_dict(
        {
            "model": {
                "backbone": "conv",
                "image_size": image_size,
                "channels": channels,
                "conv_channels": 4,
                "generator": generator,
                "prior": prior,
                "z_dims": [6, 3],
                "cond_hidden": 8,
                "enc_hidden": [16],
                "ebm_hidden": [16, 8],
                "obs_sigma": 0.3,
            },
            "train": t,
            "score": {"batch_size": 64},
        }
    )


SHAPES = list(itertools.product([28, 32, 64], [1, 3], ["chain", "ladder"]))


@pytest.mark.parametrize("image_size,channels,generator", SHAPES)
def test_conv_modules_map_flat_images_to_latents_and_back(image_size, channels, generator):
    cfg = conv_config(image_size, channels, generator).model
    model = JointEBM(cfg).eval()
    B, D, Z = 3, image_size * image_size * channels, model.z_dim
    assert cfg.data_dim == D
    decoder, trunk = model.generator.decoder, model.encoder.trunk
    assert isinstance(decoder, ConvDecoder) and isinstance(trunk, ConvTrunk)
    # ladder: z_1 and h_2 enter the decoder together; chain: z_1 alone
    n_in = 6 + (8 if generator == "ladder" else 0)
    assert decoder.project.in_features == n_in
    assert decoder(torch.randn(B, n_in)).shape == (B, D)
    x = torch.rand(B, D) * 2 - 1
    assert trunk(x).shape == (B, 16)
    z, log_q = model.encoder(x)
    assert z.shape == (B, Z) and log_q.shape == (B,)
    with torch.no_grad():
        mean = model.generator.mean_x(z)
    assert mean.shape == (B, D) and mean.abs().max() <= 1.0
    assert model.from_model_space(mean).shape == (B, *cfg.data_shape)
    assert model.log_joint(x, z).shape == (B,)


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3)])
def test_the_decoder_writes_pixels_in_h_w_c_order(image_size, channels):
    decoder = JointEBM(conv_config(image_size, channels).model).generator.decoder
    seen = {}
    decoder.up[-1].register_forward_hook(lambda mod, inp, out: seen.update(conv=out.detach().clone()))
    out = decoder(torch.randn(4, 6))  # (B, D)
    conv = seen["conv"]  # (B, C, H, W)
    assert conv.shape == (4, channels, image_size, image_size)
    torch.testing.assert_close(out.view(4, image_size, image_size, channels), conv.permute(0, 2, 3, 1), rtol=0, atol=0)


def test_the_decoder_puts_each_channel_last():
    # a last conv that writes the constant c + 1 into channel c: every pixel of the flat output reads 1, 2, 3
    decoder = JointEBM(conv_config(32, 3).model).generator.decoder
    with torch.no_grad():
        decoder.up[-1].weight.zero_()
        decoder.up[-1].bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
        out = decoder(torch.randn(2, 6))
    assert torch.equal(out.view(2, 32, 32, 3), torch.tensor([1.0, 2.0, 3.0]).expand(2, 32, 32, 3))


def test_the_inference_network_reads_pixels_in_h_w_c_order():
    # a flat image in H, W, C order whose channel c is c: the first conv sees channel c as a constant c
    trunk = JointEBM(conv_config(32, 3).model).encoder.trunk
    seen = {}
    trunk.down[0].register_forward_pre_hook(lambda mod, inp: seen.update(conv=inp[0].detach().clone()))
    x = torch.tensor([0.0, 1.0, 2.0]).repeat(2, 32 * 32)  # (B, H*W*C)
    trunk(x)
    assert torch.equal(seen["conv"], torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1).expand(2, 3, 32, 32))


@pytest.mark.parametrize("generator", ["chain", "ladder"])
def test_the_conv_decoder_is_a_function_of_each_latent_alone(generator):
    # no batch statistics: Langevin and scoring see the same g(z) for any batch size
    model = JointEBM(conv_config(28, 1, generator).model).eval()
    z = torch.randn(5, model.z_dim)
    with torch.no_grad():
        whole = model.generator.mean_x(z)
        alone = torch.cat([model.generator.mean_x(z[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("generator,prior", [("chain", "joint"), ("ladder", "layerwise")])
def test_conv_log_joint_gradients_match_finite_differences(generator, prior):
    cfg = Config.from_dict(
        {
            "model": {
                "backbone": "conv",
                "image_size": 28,
                "channels": 1,
                "conv_channels": 2,
                "generator": generator,
                "prior": prior,
                "z_dims": [3, 2],
                "cond_hidden": 6,
                "enc_hidden": [8],
                "ebm_hidden": [8],
            }
        }
    )
    model = JointEBM(cfg.model).double().eval()
    x = torch.rand(2, 784, dtype=torch.float64) * 2 - 1
    z = torch.randn(2, model.z_dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda zz: model.log_joint(x, zz), (z,), eps=1e-6, atol=1e-5)


def test_a_conv_checkpoint_round_trip_gives_identical_log_joint(tmp_path):
    config = conv_config(32, 3, "ladder")
    model = JointEBM(config.model).eval()
    x = torch.rand(4, config.model.data_dim) * 2 - 1
    with torch.no_grad():
        z, _ = model.encoder(x, sample=False)
        before = model.log_joint(x, z)
    save_model(model, config, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == config
    with torch.no_grad():
        z2, _ = loaded.model.encoder(x, sample=False)
        after = loaded.model.log_joint(x, z2)
    assert torch.equal(z, z2) and torch.equal(before, after)


def test_an_image_size_the_conv_backbone_cannot_build_is_refused():
    with pytest.raises(ConfigError, match=r"model.image_size 30 .*supported: 28, 32, 64"):
        Config.from_dict({"model": {"backbone": "conv", "image_size": 30}})
    Config.from_dict({"model": {"backbone": "mlp", "image_size": 30}})  # the MLP takes any size


def test_a_tiny_conv_model_trains_an_epoch_and_keeps_finite_weights(tmp_path):
    # 200 synthetic RGB images (N, H, W, C) in [0, 1]: a bright square on a coloured background
    rng = np.random.default_rng(0)
    images = np.empty((200, 32, 32, 3), dtype=np.float32)
    images[:] = rng.uniform(0.0, 0.5, size=(200, 1, 1, 3))
    for img, (r, c) in zip(images, rng.integers(0, 24, size=(200, 2))):
        img[r : r + 8, c : c + 8] = 1.0
    config = conv_config(32, 3)
    model = JointEBM(config.model)
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, config, images[:180], images[180:], tmp_path / "m")
    assert result.epochs_done == 1 and len(result.history) == 1
    assert np.isfinite(result.history[0]["loss"]) and np.isfinite(result.history[0]["val_neg_elbo"])
    params = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    assert (tmp_path / "m" / "weights.safetensors").is_file()


def test_a_conv_color_model_fits_from_the_cli_and_serves_the_scorers_scores(tmp_path, monkeypatch):
    """32 x 32 RGB through the conv backbone: fit a folder, score, serve, pyfunc."""
    import sys
    from pathlib import Path

    import httpx
    import mlflow
    import yaml
    from conftest import free_port, tiny_config
    from sklearn.metrics import roc_auc_score
    from test_color import shapes, write_pngs
    from test_serving import _start, _stop
    from typer.testing import CliRunner

    from jebm_od.cli.main import app
    from outlier_jebm.registry import save_pyfunc
    from outlier_jebm.scoring import Scorer

    monkeypatch.chdir(tmp_path)
    discs = shapes(240, "disc", seed=0)
    write_pngs(tmp_path / "train", discs, "disc")
    cfg = tiny_config(epochs=4, batch_size=32, sample_every=100).to_dict()
    cfg["model"].update(image_size=32, channels=3, backbone="conv", conv_channels=4, enc_hidden=[32])
    (tmp_path / "conv.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(
        app,
        [
            "fit",
            "--data",
            "train",
            "--config",
            "conv.yaml",
            "--out",
            "m",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
        ],
    )
    assert res.exit_code == 0, res.output
    loaded = load_model(tmp_path / "m")
    assert loaded.config.model.backbone == "conv" and loaded.config.model.channels == 3
    from outlier_jebm.data import load_dataset

    write_pngs(tmp_path / "test", np.concatenate([shapes(30, "disc", seed=1), shapes(30, "square", seed=2)]), "t")
    images = load_dataset(str(tmp_path / "test"), image_size=32, channels=3).images  # sorted: 30 normal, 30 odd
    assert images.shape == (60, 32, 32, 3)
    with pytest.raises(ValueError, match=r"inputs of shape \(16, 16, 3\) do not fit this model"):
        Scorer(loaded).score(shapes(2, "disc", seed=3))
    want = Scorer(loaded).score(images)["score"]
    assert roc_auc_score(np.r_[np.zeros(30), np.ones(30)], want) > 0.8

    # convolutions on a batch of 6 and of 60 may sum in another order: equal up to float32 rounding
    model = mlflow.pyfunc.load_model(str(save_pyfunc(tmp_path / "m", tmp_path / "pyfunc")))
    np.testing.assert_allclose(model.predict(images[:6])["score"], want[:6], rtol=1e-4, atol=1e-4)
    port = free_port()
    proc = _start(
        [
            sys.executable,
            "-m",
            "jebm_od.cli.main",
            "serve",
            "--model",
            str(tmp_path / "m"),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        port,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"instances": images[:6].tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([p["score"] for p in r.json()["predictions"]], want[:6], rtol=1e-4, atol=1e-4)
    finally:
        _stop(proc)
