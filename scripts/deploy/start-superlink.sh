#!/usr/bin/env bash
# Start the SuperLink and the SuperExec that runs the ServerApp (foreground; Ctrl-C stops both).
#
# Usage: start-superlink.sh [--certs DIR] [--host HOST] [--port PORT] [--insecure]
#   --certs DIR   make-certs.sh output: ca.crt, server.pem, server.key
#                 (default: $FEDBIP_DEPLOY_DIR/certs)
#   --host HOST   interface to listen on (default 0.0.0.0: reachable by the sites)
#   --port PORT   the SuperLink's one port: Fleet, Control and Runtime APIs (default 8000)
#   --insecure    no TLS and no SuperNode authentication: loopback quick try ONLY
#
# Runs, with FLWR_HOME=$FEDBIP_DEPLOY_DIR/superlink/flwr-home:
#   flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
#       --enable-supernode-auth --isolation process --disable-runtime-dependency-installation
#       --host HOST --port PORT --database $FEDBIP_DEPLOY_DIR/superlink/state.db
#       --superexec-auth-secret-file $FEDBIP_DEPLOY_DIR/superlink/superexec.secret
#   flower-superexec --runtime-api-address 127.0.0.1:PORT --root-certificates ca.crt
#       --superexec-auth-secret-file (the same secret; created on first start)
# Logs: $FEDBIP_DEPLOY_DIR/superlink/logs/ (also echoed here; appended across restarts, rotated
# by size into NAME.log.1 .. .5, never truncated). Registered node keys and runs persist in
# state.db across restarts. A second start from the same deployment folder is refused.
# Env: FEDBIP_DEPLOY_DIR (default ./deploy), PYTHON (default python: the project's venv).
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" superlink "$@"
