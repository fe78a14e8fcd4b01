#!/usr/bin/env bash
# The GPU path, checked on one CUDA machine in a few minutes (README, "GPU check"):
# the bundled default's benchmark on the GPU (fp16), then the client and synthesis on a
# full-size SD v1-4 architecture (random weights: no SD weights exist offline).
# Usage: bash scripts/gpu_check.sh OUT_DIR [METHODS] [SEEDS]   (uses the current python)
set -euo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [METHODS] [SEEDS]}
METHODS=${2:-fedbip,zero-shot,centralized}
SEEDS=${3:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python -m fedbip_flower.research.benchmark accuracy --methods "$METHODS" --seeds "$SEEDS" --out "$OUT/bundled"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python -m fedbip_flower.research.sdarch "$WORK/sd-v1-4-random"
python -m fedbip_flower.tools.deploy make-site-data "$WORK/site" photo --per-class 80 --resolution 64
# Full-size SD architecture, 512 px, fp16: client step vs UNet fwd+bwd; batched vs per-image synthesis.
python -m fedbip_flower.research.benchmark speed --batch 8 --images 64 --out "$OUT/sd512" --run-config \
  "model.id='$WORK/sd-v1-4-random' data.dataset='imagefolder' data.data-dir='$WORK/site' data.resolution=512 server.batch-size=32 server.inference-steps=20"
