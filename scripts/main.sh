#!/usr/bin/env bash
# Set up (if needed) and run the main job: FedBiP in Flower's simulation engine on the
# bundled LDM and benchmark (4 clients, one held-out style each). Exits non-zero unless
# the Flower run really completed (`flwr run` itself exits 0 even when the ServerApp fails).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
exec python -m fedbip_flower.tools.launch --output-dir outputs "$@"
