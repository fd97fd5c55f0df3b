from pathlib import Path

import pytest

from rayflow.config import load_config
from rayflow.errors import ConfigError


def test_defaults_need_no_environment():
    config = load_config(env={})
    assert config.memory.mmr_lambda == 0.7
    assert config.state_dir == Path.home() / ".rayflow"


def test_environment_overrides_defaults_and_arguments_override_environment():
    env = {"RAYFLOW_MEMORY_MMR_LAMBDA": "0.25", "RAYFLOW_STATE_DIR": "/tmp/x"}
    assert load_config(env=env).memory.mmr_lambda == 0.25
    assert load_config(env=env).state_dir == Path("/tmp/x")
    assert load_config({"memory.mmr_lambda": 0.9}, env=env).memory.mmr_lambda == 0.9


def test_unreadable_value_names_the_variable():
    with pytest.raises(ConfigError, match="RAYFLOW_MEMORY_OVERSAMPLE"):
        load_config(env={"RAYFLOW_MEMORY_OVERSAMPLE": "many"})


def test_out_of_range_values_are_refused():
    with pytest.raises(ConfigError):
        load_config({"memory.mmr_lambda": 1.5}, env={})
    with pytest.raises(ConfigError):
        load_config({"memory.durability": "sometimes"}, env={})


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown"):
        load_config({"memory.nonsense": 1}, env={})
