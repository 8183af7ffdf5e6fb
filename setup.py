"""Build of step-kernels: the Python package plus the C++/CUDA extension step_kernels._C.

C++ sources (csrc/*.cpp) are always built with -O3 -fopenmp (never -ffast-math: it breaks the NaN
rule and sets flush-to-zero for the whole process). CUDA sources (csrc/*.cu) join the build only
when torch has CUDA and nvcc's major version matches torch.version.cuda; otherwise the reason is
printed and the CPU part is built alone. Set STEP_KERNELS_NO_EXTENSION=1 to skip the extension.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return int(found.group(1)) if found else None


def cuda_build_decision(torch):
    """(use_cuda, reason): CUDA sources are built only when torch and nvcc agree."""
    if torch.version.cuda is None:
        return False, "torch is a CPU build (torch.version.cuda is None)"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if nvcc is None or not os.path.exists(nvcc):
        return False, "nvcc was not found (set CUDA_HOME)"
    major = nvcc_major(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0])
    if major != torch_major:
        return False, f"nvcc is CUDA {major} but torch was built with CUDA {torch.version.cuda}"
    return True, f"nvcc CUDA {major} matches torch CUDA {torch.version.cuda}"


def extension_modules():
    if os.environ.get("STEP_KERNELS_NO_EXTENSION") == "1":
        print("step-kernels: STEP_KERNELS_NO_EXTENSION=1, building the pure-Python package only")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda, reason = cuda_build_decision(torch)
    print(f"step-kernels: CUDA sources {'included' if use_cuda else 'skipped'}: {reason}")
    # -Wno-psabi: the CPU step's 64-byte vectors cross only always-inlined helpers (csrc/host_device.h),
    # so the ABI note GCC and clang print for its AVX2 and baseline variants describes no real call.
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno",
                 "-Wno-psabi"]
    link_flags = ["-fopenmp"]
    if use_cuda:
        ext = CUDAExtension(
            "step_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("STEP_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90,code=sm_90"],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "step_kernels._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

# Package metadata (name, version, dependencies, extras) is in pyproject.toml's [project].
setup(
    packages=["step_kernels", "step_kernels.triton_kernels"],
    package_dir={"step_kernels": "step_kernels", "step_kernels.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
