from dataclasses import replace
from pathlib import Path

import pytest

from outlier_jebm.config import Config, ConfigError, default_config_path

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    Config.from_yaml(path)


def test_the_packaged_default_is_configs_mnist_yaml_on_the_conv_backbone():
    configs = Path(__file__).parent.parent / "configs"
    assert default_config_path().resolve() == (configs / "mnist.yaml").resolve()
    assert Config.from_yaml(default_config_path()).model.backbone == "conv"
    for size in (28, 32, 64):
        assert default_config_path(image_size=size) == default_config_path()
    # sizes the conv backbone cannot take get the same model on the MLP backbone, whose fields are
    # the schema's defaults (a config written before the backbone field existed reads as MLP)
    for size in (8, 16, 100):
        assert default_config_path(image_size=size).resolve() == (configs / "mnist-mlp.yaml").resolve()
    assert Config.from_yaml(configs / "mnist-mlp.yaml") == Config()
    conv, mlp = Config.from_yaml(configs / "mnist.yaml"), Config()
    # the same score but for the posterior width's one-sided term, measured on the conv backbone only
    assert (conv.score.width_margin, mlp.score.width_margin) == (2.0, None)
    assert (conv.model.z_dims, conv.model.prior, conv.train.scheme, replace(conv.score, width_margin=None)) == (
        mlp.model.z_dims,
        mlp.model.prior,
        mlp.train.scheme,
        mlp.score,
    )
    assert default_config_path("vector").name == "vectors.yaml"


def test_a_bad_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  prior: banana\n")
    with pytest.raises(ConfigError, match="model.prior"):
        Config.from_yaml(bad)
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        Config.from_yaml(bad)


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("score:\n  steps: 0\n  knn_k: 3\n  steps: 10\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: line 4: key 'steps' given a second time in one mapping \(first on line 2\)$"
    ):
        Config.from_yaml(bad)
    bad.write_text("score:\n  steps: 0\ntrain:\n  epochs: 2\nscore:\n  knn_k: 3\n")
    with pytest.raises(ConfigError, match=r"line 5: key 'score' given a second time .*\(first on line 1\)"):
        Config.from_yaml(bad)
    ok = tmp_path / "ok.yaml"  # the same key in two different mappings is fine, and so is a merge key
    ok.write_text("train:\n  epochs: 2\n  prior_langevin: &chain {steps: 30}\n  posterior_langevin:\n    <<: *chain\n")
    cfg = Config.from_yaml(ok)
    assert cfg.train.epochs == 2 and cfg.train.prior_langevin.steps == cfg.train.posterior_langevin.steps == 30


def test_a_value_of_the_wrong_type_names_the_field_and_the_type_it_needs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_ebm: 1e-4\n")  # YAML 1.1 reads this as text
    with pytest.raises(ConfigError, match=r"bad.yaml: train.lr_ebm must be a number, got '1e-4' \(YAML reads"):
        Config.from_yaml(bad)
    base = Config()
    for path, value, needs in [
        ("train.epochs", 2.5, "a whole number"),
        ("train.epochs", True, "a whole number"),
        ("train.ebm_l2", "abc", "a number"),
        ("train.sample_steps", "x", "a whole number or null"),
        ("train.prior_langevin.noise", "yes", "true or false"),
        ("model.z_dims", [8, "4"], "a list of whole numbers"),
        ("model.prior", 3, "a string"),
    ]:
        with pytest.raises(ConfigError, match=f"{path} must be {needs}, got"):
            base.override({path: value})
    # what YAML and the command lines give for the right types still passes: an int where a float goes,
    # null where null is allowed, numpy's numbers
    import numpy as np

    cfg = base.override({"train.ebm_l2": 1, "train.sample_steps": None, "train.epochs": np.int64(3)})
    assert (cfg.train.ebm_l2, cfg.train.sample_steps, cfg.train.epochs) == (1, None, 3)


def test_overrides_are_dotted_paths_validated_every_time():
    base = Config.from_yaml(default_config_path())
    cfg = base.override({"score.steps": 7, "train.prior_langevin.steps": 3, "model.z_dims": [8, 4]})
    assert (cfg.score.steps, cfg.train.prior_langevin.steps, cfg.model.z_dims) == (7, 3, [8, 4])
    assert base.score.steps != 7 or base.train.prior_langevin.steps != 3  # the original is untouched
    assert base.override({}) == base
    with pytest.raises(ConfigError, match="score.stepz"):
        base.override({"score.stepz": 1})
    with pytest.raises(ConfigError, match="unknown config path 'scor.steps'"):
        base.override({"scor.steps": 1})
    with pytest.raises(ConfigError, match="steps"):
        base.override({"score.steps": -3})
    with pytest.raises(ConfigError, match="steps"):  # the section form goes through the same checks
        base.with_overrides(score={"steps": -3})
    assert base.with_overrides(train={"epochs": None}) == base  # None: an option that was not given


def test_sample_steps_default_to_the_training_chain_and_are_checked():
    base = Config()
    assert base.train.sample_steps is None and base.train.sampler_steps == base.train.prior_langevin.steps
    assert base.override({"train.sample_steps": 100}).train.sampler_steps == 100
    assert base.override({"train.sample_steps": 0}).train.sampler_steps == 0  # the Gaussian base alone
    with pytest.raises(ConfigError, match="train.sample_steps"):
        base.override({"train.sample_steps": -1})
    # the default config trains with 40 prior steps and samples with 100 (benchmarks/RESULTS.md)
    conv = Config.from_yaml(default_config_path())
    assert (conv.train.prior_langevin.steps, conv.train.sampler_steps) == (40, 100)


def test_knn_k_defaults_to_five_and_must_be_a_whole_number_of_neighbours():
    assert Config().score.knn_k == 5
    assert Config().override({"score.knn_k": 20}).score.knn_k == 20
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="score.knn_k"):
            Config().override({"score.knn_k": bad})


def test_width_margin_is_a_finite_number_or_off():
    assert Config().score.width_margin is None
    assert Config().override({"score.width_margin": 1.5}).score.width_margin == 1.5
    assert Config().override({"score.width_margin": 2}).score.width_margin == 2
    for bad in (float("inf"), float("nan"), "wide", True, [2.0]):
        with pytest.raises(ConfigError, match="score.width_margin"):
            Config().override({"score.width_margin": bad})
