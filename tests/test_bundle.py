"""The app bundle (FAB) carries only what nodes run, and the apps import from it alone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLING = {
    "launch",
    "deploy",
    "supervise",
    "docker_demo",
    "benchmark",
    "attacks",
    "scale",
    "pretrain",
    "ldm_report",
    "sdarch",
}


@pytest.mark.slow
def test_fab_holds_node_code_only_and_the_apps_import_from_it(tmp_path):
    flwr = Path(sys.executable).with_name("flwr")
    subprocess.run([str(flwr), "build", "--app", str(ROOT)], cwd=tmp_path, check=True, timeout=120, capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    modules = {Path(n).stem for n in names if n.startswith("fedbip_flower/")}
    assert {"strategy", "client", "server", "server_pipeline", "concepts", "synthesize"} <= modules
    # Folders too: a tool may be a package (fedbip_flower/tools/deploy/*.py).
    parts = {part for n in names if n.startswith("fedbip_flower/") for part in Path(n).with_suffix("").parts}
    tooling = TOOLING | {"tools", "research"}
    assert not parts & tooling, f"tooling in the bundle: {parts & tooling}"
    assert not [n for n in names if "assets" in n or n.endswith(".safetensors")]
    assert fab.stat().st_size < 10 * 2**20
    code = tmp_path / "code"
    zipfile.ZipFile(fab).extractall(code)
    # Import the apps from the bundle alone (the installed package is not on the path).
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONNOUSERSITE": "1"}
    probe = (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' not in p or 'fedbip' not in p];"
        "import client_app.app, server_app.app, fedbip_flower;"
        "print(fedbip_flower.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=code, env=env, check=True, timeout=120, capture_output=True, text=True
    ).stdout
    assert str(code) in out
