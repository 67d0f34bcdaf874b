"""Builds prune_ext._C: CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of torch
are present (decided from the toolkit, never from whether a GPU is visible).

PRUNE_EXT_CUDA=1 forces the CUDA build (failing if it cannot be done), PRUNE_EXT_CUDA=0 forbids it.
"""

import glob
import os
import re
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home_from_nvcc_wrapper() -> str | None:
    """The toolkit behind the `nvcc` on the PATH, when that `nvcc` is a shell script that execs the real one
    (torch's guess, two folders above the script, is wrong then)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"#!"):  # a wrapper script: find the nvcc it runs
        match = re.search(rb"(/\S*/bin/nvcc)\b", head)
        if match is None:
            return None
        real = os.path.realpath(match.group(1).decode())
    home = os.path.dirname(os.path.dirname(real))
    return home if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) else None


# Before torch.utils.cpp_extension guesses CUDA_HOME from the PATH (only the CUDA build uses it).
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _home = _cuda_home_from_nvcc_wrapper()
    if _home is not None:
        os.environ["CUDA_HOME"] = _home

from torch.utils import cpp_extension


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


def cuda_math_libraries() -> tuple[list[str], list[str], list[str], list[str]]:
    """Headers and libraries of cuBLAS and cuSOLVER: from the toolkit when it has them, else from the pip
    packages the CUDA build of torch depends on (`nvidia/cu13/{include,lib}`, or the per-library
    `nvidia/<lib>/{include,lib}` of older wheels), which ship versioned .so files only."""
    include_dirs: list[str] = []
    library_dirs: list[str] = []
    link_args: list[str] = []
    home = cpp_extension.CUDA_HOME or ""
    if os.path.isfile(os.path.join(home, "include", "cusolverDn.h")):
        return include_dirs, library_dirs, ["cublas", "cusolver"], link_args
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found: dict[str, str] = {}
    for root in roots:
        for pkg in sorted(os.listdir(root)):
            inc, lib = os.path.join(root, pkg, "include"), os.path.join(root, pkg, "lib")
            for name, header in (("cusolver", "cusolverDn.h"), ("cublas", "cublas_v2.h")):
                if name in found or not os.path.isfile(os.path.join(inc, header)):
                    continue
                sos = sorted(glob.glob(os.path.join(lib, f"lib{name}.so*")))
                if not sos:
                    continue
                found[name] = os.path.basename(sos[0])
                for d, dirs in ((inc, include_dirs), (lib, library_dirs)):
                    if d not in dirs:
                        dirs.append(d)
    missing = {"cusolver", "cublas"} - set(found)
    if missing:
        raise RuntimeError(f"CUDA build: no headers/libraries for {sorted(missing)} in {home or 'CUDA_HOME'} "
                           "nor in the nvidia pip packages (install the CUDA build of torch)")
    for name, so in found.items():  # `-l:libcusolver.so.12` links the versioned file (no bare .so there)
        link_args.append(f"-l:{so}" if so != f"lib{name}.so" else f"-l{name}")
    for d in library_dirs:  # found at run time without LD_LIBRARY_PATH: in place, and installed beside nvidia/
        rel = os.path.relpath(d, os.path.dirname(roots[0]))
        link_args += [f"-Wl,-rpath,{d}", f"-Wl,-rpath,$ORIGIN/../{rel}"]
    return include_dirs, library_dirs, [], link_args


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3"]
    if want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not __import__("torch").cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # A100, H100 (+PTX: newer GPUs) when no GPU tells us
        include_dirs, library_dirs, libraries, link_args = cuda_math_libraries()
        return cpp_extension.CUDAExtension(
            "prune_ext._C",
            sources,
            define_macros=[("PRUNE_EXT_WITH_CUDA", None)],
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link_args,
        )
    return cpp_extension.CppExtension("prune_ext._C", sources, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
