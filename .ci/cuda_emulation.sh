#!/usr/bin/env bash
# The CUDA kernels executed on the CPU (docs/cuda-emulation.md): builds jacext._C_cuda_emulated in
# the tree, beside the jacext._C that `pip install -e .` built there (JACEXT_CUDA_EMULATION=only: the
# emulated library alone), and runs tests/test_cuda_emulated.py, which must not skip. Prints the
# time each part took.
#   .ci/cuda_emulation.sh [PYTHON]     (the CPU venv's python, jacext installed with -e; default
#                                       $PYTHON, else python3)
set -euo pipefail
python=${1:-${PYTHON:-python3}}
cd "$(dirname "$0")/.."
start=$SECONDS
JACEXT_CUDA_EMULATION=only MAX_JOBS=${MAX_JOBS:-2} "$python" setup.py -q build_ext --inplace
built=$SECONDS
echo "emulated CUDA kernels built in $((built - start)) s"
"$python" -c "import jacext._C_cuda_emulated" || { echo "jacext._C_cuda_emulated does not load"; exit 1; }
"$python" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py
echo "emulated CUDA kernels tested in $((SECONDS - built)) s (build and tests: $((SECONDS - start)) s)"
