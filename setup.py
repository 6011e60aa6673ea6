"""Build script: the Python packages plus the C++ extension ``llm_engine._C``.

``kernels/`` is installed as ``llm_engine.kernels`` so we never ship a
top-level package named ``kernels``.
"""

import glob
import os
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import CompileError, LinkError

extra_compile_args = ["-O3", "-Wall", "-Wextra"]
extra_link_args: list[str] = []
if os.environ.get("LLM_ENGINE_SANITIZE"):
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    extra_compile_args = flags + ["-fno-sanitize-recover=undefined"]
    extra_link_args = flags


def _has_openmp(compiler) -> bool:
    """Whether ``compiler`` can build and link an OpenMP library (clang may take
    ``-fopenmp`` yet have no OpenMP runtime to link)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "openmp_check.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint threads() { return omp_get_max_threads(); }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_shared_object(objects, os.path.join(tmp, "openmp_check.so"),
                                        extra_postargs=["-fopenmp"])
        except (CompileError, LinkError):
            return False
    return True


class BuildExt(build_ext):
    """Builds with OpenMP where the compiler has it: the CPU kernels then run on the
    OpenMP threads that PyTorch's own CPU ops use (torch ships libgomp.so.1 and is
    imported first, so the soname resolves to it). Without it (Apple clang, clang with
    no OpenMP runtime, or ``LLM_ENGINE_OPENMP=0``) they run on the calling thread."""

    def build_extensions(self) -> None:
        openmp = os.environ.get("LLM_ENGINE_OPENMP", "1") != "0" and _has_openmp(self.compiler)
        for ext in self.extensions:
            ext.extra_compile_args += ["-fopenmp"] if openmp else ["-Wno-unknown-pragmas"]
            ext.extra_link_args += ["-fopenmp"] if openmp else []
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "llm_engine._C",
        sorted(glob.glob("csrc/**/*.cpp", recursive=True)),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]

setup(
    packages=[
        "llm_engine",
        "llm_engine.kernels",
        "llm_engine.ops",
        "llm_engine.engine",
        "llm_engine.training",
        "llm_engine.bench",
    ],
    package_dir={"llm_engine": "llm_engine", "llm_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
