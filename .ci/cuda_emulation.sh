#!/usr/bin/env bash
# The CUDA kernels executed on the CPU (docs/cuda-emulation.md): builds jacext._C_cuda_emulated in
# the tree (JACEXT_CUDA_EMULATION=1; the CPU library is rebuilt only if stale) and runs
# tests/test_cuda_emulated.py, which must not skip. Prints the time each part took.
#   .ci/cuda_emulation.sh [PYTHON]     (the CPU venv's python; default $PYTHON, else python3)
set -euo pipefail
python=${1:-${PYTHON:-python3}}
cd "$(dirname "$0")/.."
start=$SECONDS
JACEXT_CUDA_EMULATION=1 MAX_JOBS=${MAX_JOBS:-2} "$python" -m pip install -q --no-build-isolation --no-deps -e .
built=$SECONDS
echo "emulated CUDA kernels built in $((built - start)) s"
"$python" -c "import jacext._C_cuda_emulated" || { echo "jacext._C_cuda_emulated does not load"; exit 1; }
"$python" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py
echo "emulated CUDA kernels tested in $((SECONDS - built)) s (build and tests: $((SECONDS - start)) s)"
