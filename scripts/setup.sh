#!/usr/bin/env bash
# Create .venv and install fedbip-flower with what the tests need (idempotent, offline-safe).
# TORCH_SPEC overrides the torch/torchvision pins (e.g. for a CUDA build of your choice).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.fedbip-installed
works() { python -c "import fedbip_flower, torchvision, flwr, diffusers, pytest" 2>/dev/null; }
if [ -f "$stamp" ] && ! [ pyproject.toml -nt "$stamp" ]; then
  # Nothing added to or removed from site-packages since the last good check: done, without
  # the import check (it costs seconds of every main job).
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if ! [ "$site" -nt "$stamp" ]; then exit 0; fi
  if works; then touch "$stamp"; exit 0; fi
fi
python -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 install together (torchvision from PyPI does not
# import beside other torch builds); install them first so the project adds nothing.
python -m pip install -q ${TORCH_SPEC:-"torch==2.14.1" "torchvision==0.29.1"}
python -m pip install -q -e ".[test]"
works || { echo "setup: the installed packages do not import (run: python -c 'import fedbip_flower, torchvision, flwr, diffusers')" >&2; exit 1; }
touch "$stamp"
