#!/usr/bin/env bash
# Create one SuperNode authentication key pair per site (ECDSA P-384, OpenSSH).
#
# Usage: make-node-keys.sh OUT_DIR [NUM_NODES]
#   OUT_DIR    folder that receives node1, node1.pub, ..., nodeN, nodeN.pub
#   NUM_NODES  number of sites (default 3)
# Existing key pairs are kept (delete a pair to recreate it).
# Register each public key on the SuperLink with:
#   flwr supernode register OUT_DIR/nodeN.pub <superlink-connection>
set -euo pipefail

usage() {
  # Print the comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage >&2
  exit 2
fi

out_dir=$1
num_nodes=${2:-3}
if ! [[ "$num_nodes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_NODES must be a positive integer, got '$num_nodes'" >&2
  exit 2
fi

command -v ssh-keygen >/dev/null || { echo "error: ssh-keygen not found" >&2; exit 1; }

mkdir -p "$out_dir"
for ((n = 1; n <= num_nodes; n++)); do
  key="$out_dir/node$n"
  if [[ -s "$key" && -s "$key.pub" ]]; then
    echo "Keeping existing key pair $key"
    continue
  fi
  rm -f "$key" "$key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedbip-flower-node$n" -f "$key"
  echo "Wrote $key and $key.pub"
done
