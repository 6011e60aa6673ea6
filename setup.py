"""Build script: the Python packages plus the C++ extension ``llm_engine._C``.

``kernels/`` is installed as ``llm_engine.kernels`` so we never ship a
top-level package named ``kernels``.
"""

import glob
import importlib.util
import os
import tempfile

from setuptools import Extension, setup
from setuptools.errors import CompileError, LinkError

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # no pybind11 package (a bare GPU image): torch ships pybind11's headers
    from setuptools.command.build_ext import build_ext

    def Pybind11Extension(name: str, sources: list[str], *, cxx_std: int, **kwargs) -> Extension:
        torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
        kwargs["include_dirs"] = [*kwargs.get("include_dirs", []), os.path.join(torch_dir, "include")]
        kwargs["extra_compile_args"] = [f"-std=c++{cxx_std}", "-fvisibility=hidden",
                                        *kwargs.get("extra_compile_args", [])]
        return Extension(name, sources, language="c++", **kwargs)

# -fno-trapping-math: the kernels never read floating-point exception flags, and without
# it GCC leaves loops with a select before float arithmetic (exp's clamp, the sigmoid's
# sign pick) scalar under AVX2.
extra_compile_args = ["-O3", "-fno-trapping-math", "-Wall", "-Wextra"]
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
        "llm_engine.kernels.reference",
        "llm_engine.ops",
        "llm_engine.engine",
        "llm_engine.training",
        "llm_engine.bench",
        "llm_engine.server",
    ],
    package_dir={"llm_engine": "llm_engine", "llm_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
