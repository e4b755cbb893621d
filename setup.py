"""Builds lookback's Python extension with the project's CMake (see
pyproject.toml and docs/python.md): the library and the pybind11 module, then
both into the package, where the module finds the library by $ORIGIN."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def version():
    text = (ROOT / "include" / "lookback" / "version.hpp").read_text()
    return re.search(r'kVersion = "([^"]+)"', text).group(1)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = Path(self.build_temp).resolve() / "cmake"
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DLOOKBACK_BUILD_TESTS=OFF", "-DLOOKBACK_BUILD_TOOLS=OFF",
             "-DLOOKBACK_BUILD_BENCH=OFF", "-DLOOKBACK_BUILD_EXAMPLES=OFF",
             "-DLOOKBACK_BUILD_PYTHON=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
             f"-DPython_EXECUTABLE={sys.executable}"],
            check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build), "--target", "lookback_python",
                        "-j", jobs], check=True)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        built = next((build / "python" / "lookback").glob("_lookback*.so"))
        shutil.copyfile(built, target)
        # The shared library under its soname, beside the module ($ORIGIN).
        library = (build / "lib" / "liblookback.so").resolve()
        soname = "liblookback.so." + version().split(".")[0]
        shutil.copyfile(library, target.parent / soname)


setup(
    version=version(),
    ext_modules=[Extension("lookback._lookback", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    # Not build/: that is the CMake build tree of `make`.
    options={"build": {"build_base": "build-python"}},
)
