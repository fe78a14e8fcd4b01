#!/usr/bin/env bash
# Start site N: its SuperNode and the SuperExec that runs its ClientApp (foreground; Ctrl-C
# stops both).
#
# Usage: start-site.sh N DATA_DIR [--superlink HOST:PORT] [--ca FILE] [--key FILE] [--port PORT]
#                     [--num-sites M] [--threads T] [--results-dir DIR] [--insecure]
#   N             site number (1, 2, 3, ...): partition-id N-1, default key and port
#   DATA_DIR      the site's data folder (train/metadata.csv + images; make-site-data.py)
#   --superlink   the SuperLink's address (default 127.0.0.1:8000); the SuperLink
#                 certificate's SAN must contain this host name or IP
#   --ca FILE     the SuperLink's CA certificate (default: $FEDBIP_DEPLOY_DIR/certs/ca.crt)
#   --key FILE    this site's private node key; its .pub must be registered on the SuperLink
#                 (default: $FEDBIP_DEPLOY_DIR/keys/nodeN)
#   --port PORT   the SuperNode's Runtime API port on 127.0.0.1 (default 9093+N); it must be
#                 unique per machine only
#   --num-sites M num-partitions in the node config (default 3)
#   --threads T   compute threads of this site (OMP_NUM_THREADS); default: with a loopback
#                 SuperLink (every site on this machine) cores / M, else all cores
#   --results-dir where the site keeps each run's classifier and score
#                 (default $FEDBIP_DEPLOY_DIR/site-N/results: runRUN_ID/classifier.safetensors,
#                 runRUN_ID/score.json, scores.jsonl)
#   --insecure    no TLS and no node key: loopback quick try ONLY
#
# Runs, with FLWR_HOME=$FEDBIP_DEPLOY_DIR/site-N/flwr-home:
#   flower-supernode --root-certificates ca.crt --auth-supernode-private-key nodeN
#       --superlink HOST:PORT --isolation process --host 127.0.0.1 --port 9093+N
#       --node-config "data-dir='<absolute DATA_DIR>' results-dir='<absolute results>'
#                      partition-id=N-1 num-partitions=M"
#       --superexec-auth-secret-file $FEDBIP_DEPLOY_DIR/site-N/superexec.secret
#   flower-superexec --insecure --runtime-api-address 127.0.0.1:9093+N
#       --superexec-auth-secret-file (the same secret)
# A key that is not registered is refused: the SuperNode exits with
# "Exit Code: 305 ... Failed to activate SuperNode" and this script exits non-zero, saying so.
# Logs: $FEDBIP_DEPLOY_DIR/site-N/logs/ (appended, rotated by size, never truncated). A second
# start of a running site N from the same deployment folder is refused.
# Env: FEDBIP_DEPLOY_DIR (default ./deploy), PYTHON (default python), FEDBIP_BUNDLED_MODEL.
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
exec "${PYTHON:-python}" -m fedbip_flower.tools.deploy --deploy-dir "${FEDBIP_DEPLOY_DIR:-deploy}" site "$@"
