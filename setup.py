"""Build script: the Python packages plus the C++ extension ``llm_engine._C``.

``kernels/`` is installed as ``llm_engine.kernels`` so we never ship a
top-level package named ``kernels``.
"""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# OpenMP: the CPU attention kernel runs on the OpenMP threads that PyTorch's own CPU
# ops use (torch ships libgomp.so.1 and is imported first, so the soname resolves to it).
extra_compile_args = ["-O3", "-Wall", "-Wextra", "-fopenmp"]
extra_link_args = ["-fopenmp"]
if os.environ.get("LLM_ENGINE_SANITIZE"):
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1", "-fopenmp"]
    extra_compile_args = flags + ["-fno-sanitize-recover=undefined"]
    extra_link_args = flags

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
        "llm_engine.engine",
        "llm_engine.training",
        "llm_engine.bench",
    ],
    package_dir={"llm_engine": "llm_engine", "llm_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
