"""Builds zokernels and its compiled module zokernels._C by driving CMakeLists.txt.

The extension is plain pybind11 (no torch headers), so the build needs neither torch nor build isolation
downloads of it. CUDA sources (csrc/cuda) are added when nvcc exists *and* the installed torch is a CUDA build
(checked only when torch is importable, i.e. with --no-build-isolation) or ZOKERNELS_FORCE_CUDA=1.
ZOKERNELS_SKIP_EXT=1 installs pure Python (every op then runs on the torch backend).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("ZOKERNELS_FORCE_CUDA"):
        return True
    if shutil.which("nvcc") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DZOKERNELS_OUTPUT_DIR={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DZOKERNELS_WITH_CUDA={'ON' if _want_cuda() else 'OFF'}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", "2"], check=True)


ext_modules = [] if _flag("ZOKERNELS_SKIP_EXT") else [CMakeExtension("zokernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
