"""Config parsing: pyproject equals the dataclass defaults; bad keys/values fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from fedbip_flower.config import ConfigError, FedBiPConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_config_equals_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = flatten_dict(table)
    assert flat == FedBiPConfig().to_run_config()
    assert FedBiPConfig.from_run_config(flat) == FedBiPConfig()


def test_round_trip_and_coercion():
    cfg = FedBiPConfig.from_run_config({"client.lr": 1, "seed": 3.0, "client.interpolate": "false"})
    assert cfg.client.lr == 1.0 and isinstance(cfg.client.lr, float)
    assert cfg.seed == 3 and cfg.client.interpolate is False
    assert FedBiPConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("client.stepz", 3, "unknown config key.*client.stepz"),
        ("client.steps", "many", "client.steps.*integer"),
        ("client.steps", -1, "client.steps.*minimum"),
        ("client.injection", "middle", "client.injection.*not one of"),
        ("client.gamma-mean", 1.5, "client.gamma-mean.*maximum"),
        ("server.guidance-scale", "high", "server.guidance-scale.*number"),
        ("client.interpolate", 1, "client.interpolate.*true/false"),
        ("client.template", "a photo of [V]", "client.template.*\\[S\\]"),
        ("data.domains", "medical,mars", "data.domains.*mars"),
        ("server.concept-noise", float("nan"), "server.concept-noise.*finite"),
    ],
)
def test_bad_config_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        FedBiPConfig.from_run_config({key: value})


def test_configuration_page_is_generated_and_current():
    from fedbip_flower.config import config_page

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config_page(), "regenerate: python -m fedbip_flower.config > docs/configuration.md"
    missing = [k for k in FedBiPConfig().to_run_config() if f"`{k}`" not in page]
    assert not missing
