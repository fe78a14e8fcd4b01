"""`flwr run .` as Flower ships it: its local SuperLink installs the app's dependencies at run
time with ``uv sync`` into a per-run environment (flwr/supercore/superexec/dependency_installer.py).
These tests resolve the app's dependencies the same way, so a pyproject that uv cannot resolve
(e.g. a ``requires-python`` that admits a Python a dependency refuses) fails here, not in a
user's first run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# uv's messages when it cannot reach an index (no network, or offline without a cache)
UNREACHABLE = re.compile(r"Failed to fetch|error sending request|dns error|Could not connect|offline", re.I)


def _flower_sync(project: Path, env_dir: Path, offline: bool) -> subprocess.CompletedProcess:
    """Flower's own ``uv sync`` command line (dependency_installer.install_app_dependencies),
    as a dry run: resolve everything, install nothing."""
    cmd = [sys.executable, "-m", "uv", "sync", "--python", sys.executable, "--no-install-project"]
    cmd += ["--no-install-package", "flwr", "--inexact", "--dry-run"] + (["--offline"] if offline else [])
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir)}
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def _app_copy(tmp_path: Path, requires_python: str | None = None) -> Path:
    """The project files Flower's installed app holds for uv (pyproject and its readme)."""
    app = tmp_path / "app"
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    if requires_python is not None:
        text = re.sub(r'requires-python = "[^"]*"', f'requires-python = "{requires_python}"', text)
    (app / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "README.md", app / "README.md")
    return app


def _resolve(tmp_path: Path, requires_python: str | None = None) -> subprocess.CompletedProcess:
    """Resolve online; where no index answers, from uv's cache; skip if neither can."""
    app = _app_copy(tmp_path, requires_python)
    res = _flower_sync(app, tmp_path / "env", offline=False)
    if res.returncode and UNREACHABLE.search(res.stderr):
        res = _flower_sync(app, tmp_path / "env", offline=True)
        if res.returncode and UNREACHABLE.search(res.stderr):
            pytest.skip(f"no package index and no uv cache to resolve from: {res.stderr.strip()[-300:]}")
    return res


@pytest.mark.slow
def test_flowers_runtime_install_resolves_the_apps_dependencies(tmp_path):
    res = _resolve(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "diffusers==" in res.stderr + res.stdout  # it resolved the app's packages
    assert not (tmp_path / "app" / "uv.lock").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_the_resolution_check_fails_for_a_python_a_dependency_refuses(tmp_path):
    """The check can fail: the pyproject with Python 3.10 admitted does not resolve."""
    res = _resolve(tmp_path, ">=3.10")
    assert res.returncode != 0 and "No solution found" in res.stderr, res.stderr[-2000:]


def _closure() -> dict[str, metadata.Distribution]:
    """The installed distributions the project's dependencies pull in on this machine."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen[name] = dist = metadata.distribution(req.name)
        extras = req.extras
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append(sub)
    return seen


def test_requires_python_admits_no_python_a_dependency_refuses():
    """Offline (the installed environment): the project's lowest Python satisfies every
    dependency's Requires-Python; the universal resolution of ``uv sync`` needs that."""
    lowest = min(SpecifierSet(PROJECT["requires-python"]).filter(f"3.{m}" for m in range(8, 20)), key=Version)
    refusing = {
        name: dist.metadata["Requires-Python"]
        for name, dist in _closure().items()
        if dist.metadata["Requires-Python"] and lowest not in SpecifierSet(dist.metadata["Requires-Python"])
    }
    assert not refusing, f"requires-python {PROJECT['requires-python']} admits {lowest}, which these refuse: {refusing}"
    assert {"diffusers", "torch", "flwr"} <= set(_closure())
