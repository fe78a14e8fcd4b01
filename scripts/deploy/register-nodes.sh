#!/usr/bin/env bash
# Register SuperNode public keys on the SuperLink (`flwr supernode register KEY.pub CONNECTION`).
#
# Usage: register-nodes.sh [--connection NAME] KEY.pub [KEY.pub ...]
#   KEY.pub       public keys from make-node-keys.sh (each site keeps its private key)
#   --connection  the flwr CLI connection written by connect.sh (default fedbip)
# The SuperLink must be running (start-superlink.sh). A SuperNode whose key is not registered
# is refused. List: `flwr supernode ls fedbip`; remove: `flwr supernode unregister NODE_ID fedbip`.
# FLWR_HOME: as set, else $FEDBIP_DEPLOY_DIR/flwr-home.
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" register "$@"
