#!/usr/bin/env bash
# Write the flwr CLI's SuperLink connection into $FLWR_HOME/config.toml (as the default).
#
# Usage: connect.sh [--superlink HOST:PORT] [--ca FILE] [--name NAME] [--insecure]
#   --superlink   the SuperLink's address (default 127.0.0.1:8000)
#   --ca FILE     the SuperLink's CA certificate (default: $FEDBIP_DEPLOY_DIR/certs/ca.crt)
#   --name NAME   connection name, as in `flwr run . NAME` (default fedbip)
#   --insecure    plain HTTP (quick try only)
# FLWR_HOME: as set, else $FEDBIP_DEPLOY_DIR/flwr-home. The file is overwritten with:
#   [superlink]
#   default = "fedbip"
#   [superlink.fedbip]
#   address = "127.0.0.1:8000"
#   root-certificates = "/absolute/path/deploy/certs/ca.crt"
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" connection "$@"
