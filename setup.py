# SPDX-License-Identifier: Apache-2.0
"""Builds the C++ extensions (scheduler, CPU kernels) with CMake and generates the gRPC stubs.

``pip install -e .`` (or a wheel build) runs CMake on the top-level CMakeLists.txt, which builds
cpp/scheduler into ``mindie_llm/_scheduler*.so`` and cpp/kernels into ``mindie_llm/_cpu_kernels*.so``
(built by the same CMake run; both are registered so that setuptools copies both into the tree), and grpcio-tools on server/proto/*.proto.
"""
import glob
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "python" / "mindie_llm" / "server" / "proto"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake run builds every extension of ``EXTENSIONS`` into the package directory; each is
    still registered with setuptools, which copies only registered outputs into the source tree
    (``pip install -e .``, ``build_ext --inplace``)."""

    def build_extension(self, ext: Extension) -> None:
        if getattr(self, "_cmake_done", False):
            return
        self._cmake_done = True
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("MINDIE_BUILD_TYPE", "Release")
        subprocess.check_call([
            "cmake", str(ROOT), f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMINDIE_EXT_OUTPUT_DIR={out_dir}",
            f"-DMINDIE_EXT_SUFFIX={Path(ext_path.name).suffixes[-2] if len(ext_path.suffixes) > 1 else ''}{ext_path.suffix}",
            "-DMINDIE_BUILD_TESTS=OFF",
        ], cwd=build_dir)
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "--build", ".", "--target", "_scheduler", "_cpu_kernels", "-j", jobs],
                              cwd=build_dir)


def generate_grpc_stubs() -> None:
    protos = sorted(glob.glob(str(PROTO_DIR / "*.proto")))
    if not protos:
        return
    from grpc_tools import protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
            f"--python_out={PROTO_DIR}", f"--grpc_python_out={PROTO_DIR}", f"--pyi_out={PROTO_DIR}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + ", ".join(protos))
    # Generated modules import each other as top-level modules; make the imports package-relative.
    names = [Path(p).stem for p in protos]
    for gen in glob.glob(str(PROTO_DIR / "*_pb2*.py")):
        text = Path(gen).read_text()
        for n in names:
            text = text.replace(f"\nimport {n}_pb2 as ", f"\nfrom . import {n}_pb2 as ")
        Path(gen).write_text(text)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_grpc_stubs()
        super().run()


class BuildExtWithProtos(CMakeBuild):
    def run(self) -> None:
        generate_grpc_stubs()  # editable installs run build_ext but not build_py
        super().run()


setup(
    ext_modules=[CMakeExtension("mindie_llm._scheduler"), CMakeExtension("mindie_llm._cpu_kernels")],
    cmdclass={"build_ext": BuildExtWithProtos, "build_py": BuildPyWithProtos},
)
