from pathlib import Path

import pytest

from outlier_jebm.config import Config, ConfigError, default_config_path

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    Config.from_yaml(path)


def test_the_packaged_default_is_configs_mnist_yaml():
    assert default_config_path().resolve() == (Path(__file__).parent.parent / "configs" / "mnist.yaml").resolve()
    assert Config.from_yaml(default_config_path()) == Config()


def test_a_bad_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  prior: banana\n")
    with pytest.raises(ConfigError, match="model.prior"):
        Config.from_yaml(bad)
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        Config.from_yaml(bad)


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
