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
