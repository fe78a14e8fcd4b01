#!/usr/bin/env bash
# The full accuracy benchmark on one CUDA machine: every (setting, seed) in its own process,
# all at once on the one GPU (each is latency-bound at 32 px), then one merged table.
# Usage: bash scripts/gpu_bench.sh OUT_DIR [PACS_DIR]   (uses the current python)
#   PACS_DIR: PACS as an imagefolder; `python -m fedbip_flower.tools.deploy shrink-data
#   ../shared/data/pacs PACS_DIR` makes an 18 MB copy that loads to the same tensors at 32 px.
# Env: SETTINGS, SEEDS, METHODS, LIMIT (seconds per process, default 470), EXTRA (run config),
#      BENCH_FLAGS (e.g. --smoke).
set -uo pipefail
OUT=${1:?usage: gpu_bench.sh OUT_DIR [PACS_DIR]}
PACS=${2:-}
SETTINGS=${SETTINGS:-shapes-feature,shapes-label-0.5,shapes-label-0.01${PACS:+,pacs-feature}}
SEEDS=${SEEDS:-0,1,2}
# Most telling first: a process stopped by LIMIT keeps the methods it finished.
METHODS=${METHODS:-fedbip,ensemble,zero-shot,instance-only,feddeo-like,fedavg-oneshot,centralized,concept-only,output-injection,fedbip-m,fedbip-l}
LIMIT=${LIMIT:-470}
mkdir -p "$OUT/runs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
pids=()
for setting in ${SETTINGS//,/ }; do
  for seed in ${SEEDS//,/ }; do
    run="$OUT/runs/$setting-$seed"
    mkdir -p "$run"
    extra="${EXTRA:-}"
    [[ $setting == pacs-* ]] && extra="$extra data.data-dir='$(realpath "$PACS")'"
    HF_DATASETS_CACHE="$run/hf-cache" timeout "$LIMIT" python -m fedbip_flower.research.benchmark accuracy \
      --settings "$setting" --seeds "$seed" --methods "$METHODS" --out "$run" ${BENCH_FLAGS:-} \
      ${extra:+--run-config "$extra"} >"$run/log.txt" 2>&1 &
    pids+=($!)
  done
done
fail=0
for pid in "${pids[@]}"; do wait "$pid" || fail=$((fail + 1)); done
echo "$fail of ${#pids[@]} processes did not finish (a stopped one keeps its finished methods)"
rm -rf "$OUT"/runs/*/hf-cache
shopt -s nullglob
files=()
for run in "$OUT"/runs/*; do
  if [[ -f $run/benchmark.json ]]; then files+=("$run/benchmark.json")
  elif [[ -f $run/benchmark.partial.json ]]; then files+=("$run/benchmark.partial.json")
  else echo "== $run: no result; log tail:"; tail -5 "$run/log.txt"; fi
done
grep -h "INFO \[" "$OUT"/runs/*/log.txt | tail -3
python -m fedbip_flower.research.benchmark merge "${files[@]}" --out "$OUT"
