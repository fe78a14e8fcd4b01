#!/usr/bin/env bash
# The Docker Compose demo end to end: images (Flower's, or local equivalents where Docker Hub
# is out of reach), `docker compose up` of docker/compose.yml (1 SuperLink + 3 sites), one
# FedBiP run with `flwr run`, its real status, results and classifier checked, then
# `docker compose down` (also on failure or Ctrl-C). Exit 0 only if the run completed.
#
# Usage: docker-demo.sh [--tls] [--keep] [--run-config "k=v ..."]
#   --tls         TLS + SuperNode authentication (docker/compose.tls.yml): certificates, node
#                 keys and the SuperExec secret are made in docker/demo/, keys registered
#   --keep        leave the stack up (stop it: python -m fedbip_flower.tools.docker_demo down)
#   --run-config  extra overrides of [tool.flwr.app.config]
# Other subcommands: python -m fedbip_flower.tools.docker_demo images | down (--help).
# Needs: a running Docker daemon and Compose v2 (docs/deployment-docker.md, "Setting up
# Docker"), the project's venv (scripts/setup.sh). Disk: about 12 GB.
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
exec python -m fedbip_flower.tools.docker_demo run "$@"
