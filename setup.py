"""Builds prune_ext._C: CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of torch
are present (decided from the toolkit, never from whether a GPU is visible).

PRUNE_EXT_CUDA=1 forces the CUDA build (failing if it cannot be done), PRUNE_EXT_CUDA=0 forbids it.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    switch = os.environ.get("PRUNE_EXT_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    available = cpp_extension.CUDA_HOME is not None and bool(__import__("torch").version.cuda)
    if switch in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError("PRUNE_EXT_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch")
        return True
    return available


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3"]
    if want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        return cpp_extension.CUDAExtension(
            "prune_ext._C",
            sources,
            define_macros=[("PRUNE_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            libraries=["cublas", "cusolver"],
        )
    return cpp_extension.CppExtension("prune_ext._C", sources, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
