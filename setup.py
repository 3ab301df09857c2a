"""Builds lowbit's compiled CPU kernels; all metadata lives in pyproject.toml.

``lowbit.kernels._native`` is a plain C shared library (no Python or torch headers, loaded with
ctypes by ``lowbit/kernels/native.py``). It is compiled for baseline x86-64 and carries its
AVX2 / AVX-512 functions as per-function target attributes, so one build runs on any x86-64 CPU
and picks its path at run time. The extension is optional: without a working C compiler the
install still succeeds and lowbit falls back to the reference kernels (with one warning).
"""

import platform

from setuptools import Extension, setup

_x86 = platform.machine().lower() in ("x86_64", "amd64")

ext_modules = (
    [
        Extension(
            "lowbit.kernels._native",
            sources=["lowbit/kernels/csrc/lowbit_kernels.c"],
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-fopenmp-simd",
                "-pthread",
                "-fvisibility=hidden",
            ],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
    if _x86
    else []
)

setup(ext_modules=ext_modules)
