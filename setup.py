"""Builds lowbit's compiled CPU kernels; all metadata lives in pyproject.toml.

``lowbit.kernels._native`` is a plain C shared library (no Python or torch headers, loaded with
ctypes by ``lowbit/kernels/native.py``). It is compiled for baseline x86-64 and carries its
AVX2 / AVX-512 functions as per-function target attributes, so one build runs on any x86-64 CPU
and picks its path at run time. The extension is optional: without a working C compiler the
install still succeeds and lowbit falls back to the reference kernels (with one warning).

It is built with OpenMP so the kernels run on torch's own thread team (torch's libgomp is already
loaded when lowbit loads the library); a compiler without OpenMP gets a second try without it,
and the kernels then run on the calling thread only.
"""

import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: retry without OpenMP
            print(f"building {ext.name} with OpenMP failed ({exc}); retrying without")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
            super().build_extension(ext)


_x86 = platform.machine().lower() in ("x86_64", "amd64")

ext_modules = (
    [
        Extension(
            "lowbit.kernels._native",
            sources=["lowbit/kernels/csrc/lowbit_kernels.c", "lowbit/kernels/csrc/lowbit_binary.c"],
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-fopenmp",
                "-pthread",
                "-fvisibility=hidden",
            ],
            extra_link_args=["-fopenmp", "-pthread"],
            optional=True,
        )
    ]
    if _x86
    else []
)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
