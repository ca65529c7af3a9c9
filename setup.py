"""Build specfast: the Python packages, `kernels/` as `specfast.kernels`, and the C++ shard I/O
extension `specfast._shardio` (built with CMake when `CMakeLists.txt` is present)."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake; the library lands where setuptools expects the extension."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        cfg = "Debug" if self.debug else "Release"
        subprocess.check_call(
            [
                "cmake",
                str(ROOT),
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                f"-DPYTHON_EXECUTABLE={sys.executable}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DCMAKE_BUILD_TYPE={cfg}",
            ],
            cwd=build_temp,
        )
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(
            ["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp
        )


ext_modules = [CMakeExtension("specfast._shardio")] if (ROOT / "CMakeLists.txt").exists() else []

setup(
    name="specfast",
    version="0.1.0",
    description="Fast, lean training of EAGLE-3 speculative-decoding draft models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["specfast", "specfast.kernels"]
    + [f"specfast.{p.name}" for p in (ROOT / "specfast").iterdir() if (p / "__init__.py").exists()],
    package_dir={"specfast": "specfast", "specfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "safetensors>=0.4",
        "transformers>=4.46",
        "tokenizers",
        "gguf",
        "accelerate",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "triton>=3.0; platform_system == 'Linux'"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["specfast=specfast.cli:main"]},
    zip_safe=False,
)
