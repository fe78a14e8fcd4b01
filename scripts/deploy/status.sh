#!/usr/bin/env bash
# One screen on the deployment: the registered sites (with their names), the last runs, and the
# latest run's phase, replies, rejections and per-site scores (from its ServerApp log).
#
# Usage: status.sh [--connection NAME] [--run-id ID]
#   --connection  the flwr CLI connection written by connect.sh (default fedbip)
#   --run-id      the run to summarise (default: the latest)
# Reads the SuperLink through the flwr CLI (`flwr supernode ls`, `flwr ls`, `flwr log --show`),
# so it works wherever the CLI has the connection. Site names come from register-nodes.sh's
# record ($FLWR_HOME/fedbip-node-names.json): Flower 1.42's `flwr supernode ls` does not show them.
# FLWR_HOME: as set, else $FEDBIP_DEPLOY_DIR/flwr-home.
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" status "$@"
