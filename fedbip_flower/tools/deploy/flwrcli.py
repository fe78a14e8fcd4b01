"""Calls to the ``flwr`` CLI that the operator's side of a deployment needs: register a
SuperNode's public key (and remember the site name it was registered with), list the
SuperNodes, wait until they are online. Every call is bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from fedbip_flower.jsonio import write_json
from fedbip_flower.tools.deploy.common import DEFAULT_DEPLOY_DIR, DeployError
from fedbip_flower.tools.launch import BIN

NAMES_FILE = "fedbip-node-names.json"  # in the flwr CLI's FLWR_HOME: node id -> site name


def cli_home(deploy_dir: Path = DEFAULT_DEPLOY_DIR) -> Path:
    """FLWR_HOME of the ``flwr`` CLI: $FLWR_HOME if set, else <deploy_dir>/flwr-home."""
    return Path(os.environ.get("FLWR_HOME") or Path(deploy_dir) / "flwr-home").resolve()


def flwr_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One ``flwr`` CLI call, never longer than ``timeout`` seconds (then DeployError)."""
    try:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise DeployError(f"`flwr {' '.join(args[:2])}` did not answer in {timeout:.0f} s") from err


def remember_name(flwr_home: Path, node_id: int, name: str) -> None:
    """Record the site name a node was registered with (``flwr supernode ls`` in Flower 1.42
    does not show it; ``status`` does)."""
    path = Path(flwr_home) / NAMES_FILE
    names = node_names(flwr_home)
    names[str(node_id)] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, names, sort_keys=True)


def node_names(flwr_home: Path) -> dict[str, str]:
    """The site names recorded by :func:`remember_name` (node id -> name); empty if none."""
    try:
        data = json.loads((Path(flwr_home) / NAMES_FILE).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def register_node(public_key: Path, connection: str, env: dict[str, str], name: str | None = None) -> int:
    """``flwr supernode register``; returns the node id (and records its name under the CLI's
    FLWR_HOME). Raises DeployError on failure."""
    args = ["supernode", "register", str(Path(public_key).resolve()), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    res = flwr_cli(args, env)
    try:
        data = json.loads(res.stdout)
        node_id = int(data["node-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DeployError(
            f"`flwr supernode register {public_key}` failed ({res.returncode}):\n{res.stdout}{res.stderr}"
        ) from err
    if name and env.get("FLWR_HOME"):
        remember_name(Path(env["FLWR_HOME"]), node_id, name)
    return node_id


def supernodes(connection: str, env: dict[str, str], timeout: float = 60) -> list[dict]:
    """``flwr supernode ls --format json``: one dict per registered node."""
    res = flwr_cli(["supernode", "ls", connection, "--format", "json"], env, timeout)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError as err:
        raise DeployError(f"`flwr supernode ls` failed: {res.stdout}{res.stderr}") from err
    if isinstance(data, dict) and data.get("success") is False:
        raise DeployError(f"`flwr supernode ls` failed: {str(data.get('error-message', ''))[-500:]}")
    nodes = data.get("nodes", []) if isinstance(data, dict) else data
    return [n for n in nodes or [] if isinstance(n, dict)]


def wait_online(connection: str, env: dict[str, str], count: int, timeout: float = 60.0) -> list[dict]:
    """Wait until ``count`` SuperNodes are online; returns them."""
    deadline = time.time() + timeout
    while True:
        try:
            nodes = supernodes(connection, env, timeout=max(10.0, min(60.0, deadline - time.time())))
        except DeployError:
            if time.time() > deadline:
                raise
            nodes = []
        online = [n for n in nodes if n.get("status") == "online"]
        if len(online) >= count:
            return online
        if time.time() > deadline:
            raise DeployError(f"only {len(online)} of {count} SuperNode(s) online after {timeout:.0f} s")
        time.sleep(1.0)
