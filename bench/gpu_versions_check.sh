#!/usr/bin/env bash
# Before spending GPU time: build and test on this CPU with the GPU machine's torch and triton.
#
#   bash bench/gpu_versions_check.sh [WORKDIR]      (default /tmp/gpu-versions)
#
# The GPU machine runs torch 2.11 (CUDA 13.0) and triton 3.6. This makes a virtual environment
# on top of the system packages with those two versions (and numpy < 2.3: triton 3.6's
# interpreter breaks on numpy 2.4), clones the committed tree, builds the extension against
# torch 2.11's headers (CUDA kernels included, no GPU needed), compiles every Triton launch
# configuration with triton 3.6 for sm_90 (spills fail it), and runs the whole test suite.
# About 10 minutes and a 530 MB download.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/gpu-versions}
TORCH_VERSION=${GPU_TORCH_VERSION:-2.11.0}
TRITON_VERSION=${GPU_TRITON_VERSION:-3.6.0}

rm -rf "$WORK"
mkdir -p "$WORK"
python -m venv --system-site-packages "$WORK/venv"
PY="$WORK/venv/bin/python"
# --no-deps: the system's CUDA wheels (headers, runtime) serve both torch versions here.
"$PY" -m pip install --quiet --no-deps "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.3"
git clone --quiet "$ROOT" "$WORK/tree"
cd "$WORK/tree"
"$PY" -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
"$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
"$PY" -c "import cossim_fast; print('extension:', cossim_fast.extension_status())"
env -u TRITON_INTERPRET "$PY" -m bench.resources --only triton --arch 90 > "$WORK/resources.md"
echo "Triton launch configurations compile for sm_90 without spills ($WORK/resources.md)"
"$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning
