"""Build hook for the native CPU kernels (src/mlxedge/cpu): an MLX extension compiled by CMake through
MLX's own helper (mlx.extension.CMakeBuild). Project metadata lives in pyproject.toml.

MLXEDGE_SKIP_CPU_EXT=1 installs the package without the extension (everything then runs on MLX's
built-ins and `mlxedge.cpu.describe()` says so)."""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("MLXEDGE_SKIP_CPU_EXT") != "1":
    from mlx import extension

    class CMakeBuild(extension.CMakeBuild):
        def build_extension(self, ext):
            # Ninja comes from the build requirements; its parallel build is the faster one
            os.environ.setdefault("CMAKE_GENERATOR", "Ninja")
            super().build_extension(ext)

    ext_modules = [extension.CMakeExtension("mlxedge.cpu._ext", sourcedir="src/mlxedge/cpu")]
    cmdclass = {"build_ext": CMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
