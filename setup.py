"""Build jacext: a C++ extension, plus CUDA kernels whenever torch is a CUDA build and a CUDA
toolkit (nvcc) is found, whether or not a GPU is visible (clusters build on login nodes).

    pip install --no-build-isolation -e .          # compiles against the installed torch

JACEXT_FORCE_CPU=1 skips the CUDA kernels; JACEXT_FORCE_CUDA=1 makes their absence an error. Without
a visible GPU and without TORCH_CUDA_ARCH_LIST, the kernels are built for sm_80 and sm_90 plus PTX
(which newer GPUs compile when the library loads).

JACEXT_CUDA_EMULATION=1 also builds jacext._C_cuda_emulated, with or without CUDA: the CUDA kernel
files compiled as C++ against a CPU shim (csrc/cuda/emulation/cuda_on_cpu.h), their ops registered for
CPU tensors in the library jacext_cuda_emulated, for tests/test_cuda_emulated.py (docs/cuda-emulation.md).
JACEXT_CUDA_EMULATION=only builds that one alone, beside an existing build of jacext._C:

    JACEXT_CUDA_EMULATION=only python setup.py build_ext --inplace      # .ci/cuda_emulation.sh
"""
import glob
import os
import shutil
import site
import sys

from setuptools import setup


def find_cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME, else the folder of the nvcc on PATH (through any
    wrapper script), else /usr/local/cuda. torch would guess /usr/local for a wrapper in
    /usr/local/bin, which holds no CUDA headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for folder in candidates:
        if folder and os.path.exists(os.path.join(folder, "include", "cuda_runtime.h")):
            return folder
    return None


def pip_nvidia_includes():
    """The pip CUDA wheels' header folder (nvidia/cu13/include: cuBLAS, cuSPARSE, ...), which the
    CUDA torch's headers include, when it is installed beside torch."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = [f for root in roots for f in glob.glob(os.path.join(root, "nvidia", "cu1*", "include"))]
    return sorted(set(f for f in found if os.path.isdir(f)))


force_cuda = os.environ.get("JACEXT_FORCE_CUDA") == "1"
force_cpu = os.environ.get("JACEXT_FORCE_CPU") == "1"

import torch  # noqa: E402

# CUDA_HOME must be settled before torch.utils.cpp_extension is imported: it reads it then.
cuda_home = None if force_cpu or torch.version.cuda is None else find_cuda_home()
if cuda_home and "CUDA_HOME" not in os.environ:
    os.environ["CUDA_HOME"] = cuda_home
use_cuda = cuda_home is not None
if force_cuda and not use_cuda:
    sys.exit("jacext: JACEXT_FORCE_CUDA=1, but " + (
        "JACEXT_FORCE_CPU=1 is set too" if force_cpu else
        "the installed torch is a CPU build" if torch.version.cuda is None else
        "no CUDA toolkit was found (set CUDA_HOME, or put nvcc on PATH)"))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
sources = [os.path.join("csrc", "jacext.cpp"), os.path.join("csrc", "frobenius_autograd.cpp"),
           os.path.join("csrc", "carry_autograd.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# -fopenmp: at::parallel_for is an inline template that runs serially unless the extension itself
# is compiled with OpenMP (ATen/Parallel-inl.h). No link flag: the OpenMP runtime is torch's own
# libgomp, already loaded with libtorch_cpu (a second runtime would oversubscribe the cores).
# -fno-trapping-math (as torch's own build): lets GCC compute both sides of a select in the CPU
# inner loops so that they vectorize (tanh_float_loop); nothing here enables FP exceptions, and
# results are unchanged (no reassociation).
openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform != "darwin" else []
cxx_flags = ["-O3", "-fno-trapping-math"] + openmp
if use_cuda:
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # PTX: GPUs newer than sm_90 JIT-compile it
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    includes = pip_nvidia_includes()
    extension = CUDAExtension(
        "jacext._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")] + includes,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    print(f"jacext: building CPU + CUDA kernels (CUDA_HOME={os.environ.get('CUDA_HOME')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}, "
          f"pip CUDA headers: {includes or 'none'})")
else:
    extension = CppExtension(
        "jacext._C", sources, include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )
    reason = ("JACEXT_FORCE_CPU=1" if force_cpu else "torch is a CPU build" if torch.version.cuda is None
              else "no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH")
    print(f"jacext: building CPU kernels only ({reason})")

emulation = os.environ.get("JACEXT_CUDA_EMULATION")
extensions = [] if emulation == "only" else [extension]
if emulation in ("1", "only"):
    # g++ takes a .cu file for CUDA: each is compiled through a generated one-line .cpp instead.
    emulation_dir = os.path.join("build", "cuda_emulation")
    os.makedirs(emulation_dir, exist_ok=True)
    emulated_sources = [os.path.join("csrc", "cuda", "emulation", "module.cpp")]
    for cu in sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))):
        wrapper = os.path.join(emulation_dir, os.path.basename(cu)[:-3] + ".cpp")
        text = f'#include "{os.path.join(here, cu)}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:  # unchanged: no rebuild
            with open(wrapper, "w") as f:
                f.write(text)
        emulated_sources.append(wrapper)
    extensions.append(CppExtension(
        "jacext._C_cuda_emulated", emulated_sources, include_dirs=[os.path.join(here, "csrc")],
        # -O1 -g0: a test build, compiled on every CI run: compile time counts more than speed
        define_macros=[("JACEXT_CUDA_EMULATION", "1")], extra_compile_args={"cxx": ["-O1", "-g0"] + openmp},
    ))
    print("jacext: also building the emulated CUDA kernels (jacext._C_cuda_emulated)")

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtension},
)
