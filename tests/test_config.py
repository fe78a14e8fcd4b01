"""Config parsing: pyproject equals the dataclass defaults; bad keys/values fail by name."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, parse_config_args

from fedbip_flower.config import (
    ClassifierConfig,
    ClientConfig,
    ConfigError,
    DataConfig,
    FedBiPConfig,
    ModelConfig,
    ServerConfig,
    experiment_names,
    load_experiment,
    run_config_string,
)
from fedbip_flower.research import benchmark
from fedbip_flower.tools import launch

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


def test_every_experiment_preset_is_a_valid_run_config():
    names = experiment_names()
    assert {"shapes-feature", "shapes-label-0.5", "benchmark", "smoke"} <= set(names)
    assert set(benchmark.SETTINGS) <= set(names)
    for name in names:
        flat = load_experiment(name)
        assert flat and all("." in k or k in ("seed", "min-clients", "output-dir") for k in flat), name
        cfg = FedBiPConfig.from_run_config(flat)
        assert cfg.to_run_config().items() >= flat.items(), name
    label = FedBiPConfig.from_run_config(load_experiment("shapes-label-0.5"))
    assert (label.min_clients, label.data.partition_by, label.data.alpha) == (5, "dirichlet", 0.5)
    # The experiments that are settings name their sites: the benchmark and launcher read it.
    for name in benchmark.SETTINGS:
        assert "min-clients" in load_experiment(name), name


def test_experiment_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="no experiment 'nope'.*shipped: .*shapes-feature"):
        load_experiment("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('data.partition-by = "domain"\nclient.stepz = 3\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*client\.stepz"):
        load_experiment(bad)
    bad.write_text("data.alpha = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(str(bad))


def test_run_config_string_round_trips_through_flower():
    over = {**load_experiment("shapes-label-0.5"), "output-dir": "/tmp/a b", "client.interpolate": False}
    assert parse_config_args([run_config_string(over)]) == over
    with pytest.raises(ConfigError, match="double quotes"):
        run_config_string({"client.template": 'a "quoted" [S] [V]'})


def test_launcher_refuses_a_bad_experiment_before_starting_flower(capsys):
    assert launch.main(["--experiment", "nope"]) == 2
    assert launch.main(["--experiment", "smoke", "--run-config", "data.shots=-1"]) == 2
    err = capsys.readouterr().err
    assert "NOT STARTED: no experiment 'nope'" in err and "data.shots" in err


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ClientConfig(n_s=100), "'client.n-s': 100 is above the maximum 8"),
        (lambda: ClientConfig(injection="middle"), "'client.injection': 'middle' is not one of"),
        (lambda: ServerConfig(multiplier=0), "'server.multiplier': 0 is below the minimum 1"),
        (lambda: dataclasses.replace(ClassifierConfig(), epochs=0), "'classifier.epochs': 0 is below"),
        (lambda: dataclasses.replace(FedBiPConfig(), seed=1.5), "'seed': expected int"),
        (lambda: ModelConfig(device="gpu"), "model.device"),
        (lambda: FedBiPConfig(data=DataConfig(domains="nowhere")), "'data.domains': unknown style"),
        (lambda: DataConfig(alpha=float("nan")), "'data.alpha': expected float"),
    ],
)
def test_every_way_of_building_a_config_is_checked(build, message):
    """Bounds, choices, types and cross-key rules hold for constructed and replaced configs
    too, not only for parsed run configs."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()
