#!/usr/bin/env bash
# INSECURE loopback quick try: a SuperLink and N sites on this machine (process isolation, plain
# HTTP, no node authentication), one checked FedBiP run, then everything is stopped.
#
# Usage: quick-try.sh [--num-sites N] [--per-class K] [--run-config "k=v ..."]
#   --num-sites   sites to start (default 3; styles medical, satellite, thermal, chalkboard)
#   --per-class   images per class in each generated site folder (default 24: 16 training + 8 test)
#   --run-config  extra overrides, e.g. "client.steps=20 classifier.epochs=5"
# Everything goes to $FEDBIP_DEPLOY_DIR/quick-try/ (sites/, outputs/, one folder per role).
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" quick-try "$@"
