#!/usr/bin/env bash
# Create a self-signed CA and a SuperLink server certificate for TLS tests.
#
# Usage: make-certs.sh OUT_DIR [SAN]
#   OUT_DIR  folder that receives ca.crt, ca.key, server.csr, server.pem, server.key
#   SAN      subjectAltName list (default: $FLWR_CERT_SAN or
#            "IP:127.0.0.1,DNS:localhost,DNS:superlink"). It must name every
#            address clients dial: the flwr CLI (127.0.0.1), SuperNodes and the
#            ServerApp SuperExec inside Docker Compose (superlink).
# Env:
#   FLWR_CERT_DAYS  validity in days (default 365)
#   FLWR_CERT_BITS  RSA key size (default 4096)
#   FORCE=1         overwrite existing files (default: keep them and exit 0)
#
# These are test certificates. Use your organisation's PKI in production.
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
san=${2:-${FLWR_CERT_SAN:-IP:127.0.0.1,DNS:localhost,DNS:superlink}}
days=${FLWR_CERT_DAYS:-365}
bits=${FLWR_CERT_BITS:-4096}

command -v openssl >/dev/null || { echo "error: openssl not found" >&2; exit 1; }

mkdir -p "$out_dir"

if [[ -s "$out_dir/ca.crt" && -s "$out_dir/server.pem" && -s "$out_dir/server.key" \
      && "${FORCE:-0}" != "1" ]]; then
  echo "Certificates already exist in $out_dir (set FORCE=1 to recreate)."
  exit 0
fi

# Restrictive umask while writing private keys.
old_umask=$(umask)
umask 077

# 1. Certificate authority.
openssl genrsa -out "$out_dir/ca.key" "$bits" 2>/dev/null
openssl req -x509 -new -nodes -key "$out_dir/ca.key" -sha256 -days "$days" \
  -subj "/O=fedbip-flower test CA/CN=fedbip-flower CA" \
  -out "$out_dir/ca.crt"

# 2. Server key and signing request.
openssl genrsa -out "$out_dir/server.key" "$bits" 2>/dev/null
openssl req -new -key "$out_dir/server.key" \
  -subj "/O=fedbip-flower/CN=superlink" \
  -out "$out_dir/server.csr"

# 3. Server certificate signed by the CA, with the SAN list.
ext_file=$(mktemp)
trap 'rm -f "$ext_file"' EXIT
cat >"$ext_file" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
EXT
openssl x509 -req -in "$out_dir/server.csr" -CA "$out_dir/ca.crt" -CAkey "$out_dir/ca.key" \
  -CAcreateserial -out "$out_dir/server.pem" -days "$days" -sha256 \
  -extfile "$ext_file" 2>/dev/null

umask "$old_umask"
chmod 644 "$out_dir/ca.crt" "$out_dir/server.pem" "$out_dir/server.csr"

openssl verify -CAfile "$out_dir/ca.crt" "$out_dir/server.pem" >/dev/null
echo "Wrote CA and server certificate to $out_dir (SAN: $san)."
