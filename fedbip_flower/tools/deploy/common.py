"""What all deployment helpers share: the error type and the deployment's defaults (ports,
connection name, deployment folder)."""

from __future__ import annotations

from pathlib import Path

SUPERLINK_PORT = 8000
SITE_PORT_BASE = 9093  # site N serves its Runtime API on 127.0.0.1:(9093 + N)
DEFAULT_CONNECTION = "fedbip"
DEFAULT_DEPLOY_DIR = Path("deploy")


class DeployError(RuntimeError):
    """Bad deployment input (missing certificate, key, data folder, ...)."""
