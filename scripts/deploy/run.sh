#!/usr/bin/env bash
# Start a FedBiP run on the deployment and check it: `flwr run . CONNECTION --stream`, then the
# run's REAL status from `flwr ls --run-id` (flwr run exits 0 even when the run fails), then the
# ServerApp's results.json. Exits 0 only for finished:completed.
#
# Usage: run.sh [--connection NAME] [--output-dir DIR] [--run-config "k=v ..."] [--app DIR]
#   --output-dir  where the ServerApp writes <stamp>-run<id>/ (default $FEDBIP_DEPLOY_DIR/outputs;
#                 a path on the SuperLink machine, made absolute here)
#   --run-config  overrides of [tool.flwr.app.config], e.g. "min-clients=3 seed=1"
# FLWR_HOME: as set, else $FEDBIP_DEPLOY_DIR/flwr-home.
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" run "$@"
