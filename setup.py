"""Builds the native kernels (lazymoe_jax/kernels/csrc) as a plain shared library, optionally.

Everything else is declared in pyproject.toml. The library is a C++17 file built against the
XLA FFI headers that jaxlib ships (a build requirement; nothing of it is linked): no Python
headers are needed, the Python side loads it with ctypes. If there is no compiler, or the
build fails, the install goes on without it and lazymoe_jax.kernels falls back to the XLA
path with a one-line warning (BUILD_NOTES.md, "Native kernels").
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["rowdot.cc", "gemv.cc", "expert_ffn.cc", "attn_ops.cc", "attention.cc"]
CSRC = os.path.join("lazymoe_jax", "kernels", "csrc")


class OptionalBuildExt(build_ext):
  """build_ext that finds the FFI headers at build time and never fails the install."""

  def build_extension(self, ext):
    try:
      import jaxlib  # pylint: disable=import-outside-toplevel
      include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
      if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        raise RuntimeError(f"no XLA FFI headers under {include}")
      ext.include_dirs.append(include)
      super().build_extension(ext)
    except Exception as e:  # pylint: disable=broad-except
      sys.stderr.write(f"WARNING: lazymoe_jax native kernels not built ({e}); the XLA path "
                       "will be used.\n")

  def get_export_symbols(self, ext):
    return []  # a ctypes library: no PyInit_ symbol


setup(
    ext_modules=[Extension(
        "lazymoe_jax.kernels._lazymoe_kernels",
        sources=[os.path.join(CSRC, s) for s in SOURCES],
        depends=[os.path.join(CSRC, h) for h in ("rowdot.h", "ffi_common.h", "attn_ops.h")],
        language="c++",
        # -ffp-contract=off: no a * b + c fused behind the code's back. The kernels' results
        # are bit-identical across token counts and call splits only if every such sum rounds
        # as written. Required: gcc's C++ front end fuses even with ISO -std=c++17
        # (BUILD_NOTES "session 16").
        extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-Wno-uninitialized",
                            "-Wno-maybe-uninitialized"],
        optional=True,
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
