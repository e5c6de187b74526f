#!/usr/bin/env bash
# Static resource check of the CUDA kernels, without a GPU: ptxas compiles csrc/cuda/*.cu for sm_90
# (device code only) and reports each kernel's registers, shared memory, stack frame and spills.
# Prints them per kernel; fails if any kernel spills, uses local memory (a stack frame, lmem) or more
# than 48 KiB of static shared memory.
#   .ci/ptxas_check.sh CUDA_VENV     (a venv with the CUDA build of torch; nvcc on PATH or CUDA_HOME)
set -euo pipefail
venv=${1:?usage: .ci/ptxas_check.sh CUDA_VENV}
cd "$(dirname "$0")/.."
nvcc=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
nvcc=${nvcc:-$(command -v nvcc)}
# torch's headers (and the pip CUDA wheels' ones that they include), as setup.py compiles with
mapfile -t includes < <("$venv/bin/python" - <<'PY'
import glob, os, site, sysconfig
from torch.utils import cpp_extension
try:
    paths = cpp_extension.include_paths(device_type="cuda")
except TypeError:  # older torch
    paths = cpp_extension.include_paths(cuda=True)
for root in site.getsitepackages():
    paths += sorted(glob.glob(os.path.join(root, "nvidia", "cu1*", "include")))
paths.append(sysconfig.get_paths()["include"])
print("\n".join(paths))
PY
)
work=$(mktemp -d "${TMPDIR:-/tmp}/jacext-ptxas.XXXXXX")
trap 'rm -rf "$work"' EXIT
for cu in csrc/cuda/*.cu; do
  if ! "$nvcc" -cubin -arch=sm_90 -O3 -std=c++20 --expt-relaxed-constexpr \
      -Xptxas -v,-warn-spills,-warn-lmem-usage -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      -Icsrc "${includes[@]/#/-I}" "$cu" -o "$work/$(basename "$cu").cubin" > "$work/$(basename "$cu").log" 2>&1; then
    cat "$work/$(basename "$cu").log"
    echo "ptxas check: $cu does not compile"
    exit 1
  fi
done
python3 - "$work" <<'PY'
import glob, os, re, subprocess, sys
kernels, current, bad = {}, None, []
for log in sorted(glob.glob(os.path.join(sys.argv[1], "*.log"))):
    for line in open(log):
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = kernels.setdefault(m[1], {})
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m[1])
            current["smem"] = int(s[1]) if (s := re.search(r"(\d+) bytes smem", line)) else 0
            current["lmem"] = int(s[1]) if (s := re.search(r"(\d+) bytes lmem", line)) else 0
        if "ptxas warning" in line:
            bad.append(line.strip())
if not kernels:
    sys.exit("ptxas check: no kernel figures in the ptxas output")
names = list(kernels)
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
print(f"{'regs':>5} {'smem':>6} {'stack':>5} {'spill st/ld':>11} {'lmem':>5}  kernel (sm_90)")
for name, pretty in zip(names, demangled):
    k = {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "lmem": 0, **kernels[name]}
    print(f"{k['registers']:5d} {k['smem']:6d} {k['stack']:5d} {k['spill_stores']:5d}/{k['spill_loads']:<5d} "
          f"{k['lmem']:5d}  {pretty}")
    if k["spill_stores"] or k["spill_loads"] or k["stack"] or k["lmem"]:
        bad.append(f"spills or local memory: {pretty}")
    if k["smem"] > 48 * 1024:
        bad.append(f"more than 48 KiB of static shared memory: {pretty}")
print(f"{len(kernels)} kernels")
if bad:
    sys.exit("\n".join(["ptxas check FAILED:"] + bad))
print("ptxas check passed: no spills, no local memory")
PY
