"""Full `flwr run` in simulation against a SuperLink the test starts and stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbip_flower.tools.launch import LaunchError, simulate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _rc(cfg: dict) -> str:
    return " ".join(
        f"{k}='{v}'" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in cfg.items()
    )


def test_flwr_run_simulation_completes(fast_run_config, tmp_path):
    run, res = simulate(ROOT, 2, _rc(fast_run_config), tmp_path, flwr_home=tmp_path / "flwr", echo=False)
    assert run["status"] == "finished:completed"
    assert res["status"] == "completed" and len(res["clients"]) == 2
    assert all(c["status"] == "accepted" and c["accuracy"] is not None for c in res["clients"])
    assert {c["domain"] for c in res["clients"]} == {"medical", "satellite"}
    assert Path(res["results_path"]).parent.joinpath("classifier.safetensors").is_file()
    # the SuperLink and its children are gone
    import subprocess

    out = subprocess.run(["pgrep", "-f", str(tmp_path / "flwr")], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_a_failing_server_app_is_reported_as_failure(fast_run_config, tmp_path):
    """`flwr run` exits 0 here; the launcher must still see the failed run."""
    bad = {**fast_run_config, "model.id": str(tmp_path / "no-such-model")}
    with pytest.raises(LaunchError, match="finished:failed"):
        simulate(ROOT, 2, _rc(bad), tmp_path, flwr_home=tmp_path / "flwr", echo=False)
