"""Builds jcaffe's one compiled piece, the oneDNN convolution kernels (``jcaffe/_onednn``).

Everything else is in ``pyproject.toml``. The extension is optional: without a C++ compiler,
or without the build requirements' headers (JAX's XLA FFI headers in jaxlib, oneDNN's in
``onednn-devel-cpu-gomp``), the install goes on without it, says so, and jcaffe convolves in
pure JAX (``jcaffe.onednn.available()`` tells which).

The library is a plain shared object loaded with ctypes, not a Python module: it links
against oneDNN's ``libdnnl.so.3`` by name, and jcaffe loads that library first from wherever
pip installed ``onednn-cpu-gomp``.
"""

import importlib.metadata
import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _dist_file(dist: str, suffix: str) -> pathlib.Path | None:
    """The installed file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix().endswith(suffix):
            return pathlib.Path(f.locate()).resolve()
    return None


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            import jax.ffi

            ffi_include = jax.ffi.include_dir()
        except Exception:  # jaxlib without the FFI headers, or not importable
            try:
                import jaxlib

                ffi_include = str(pathlib.Path(jaxlib.__file__).parent / "include")
            except Exception:
                ffi_include = None
        header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
        dnnl_include = str(header.parents[2]) if header else None
        dnnl_lib = _dist_file("onednn-cpu-gomp", "/libdnnl.so.3")
        missing = [name for name, d in (("XLA FFI headers (jaxlib)", ffi_include),
                                        ("oneDNN headers (onednn-devel-cpu-gomp)", dnnl_include),
                                        ("oneDNN (onednn-cpu-gomp)", dnnl_lib)) if d is None]
        if missing:
            self.warn(f"jcaffe: not building the oneDNN convolution kernels: missing "
                      f"{', '.join(missing)}; convolutions run in pure JAX")
            return
        ext.include_dirs += [ffi_include, dnnl_include]
        # Link by soname; the wheel ships libdnnl.so.3 as a file, no unversioned link needed.
        ext.extra_link_args += [str(dnnl_lib)]
        try:
            super().build_extension(ext)
        except Exception as e:  # no compiler, or it failed: the pure-JAX path remains
            self.warn(f"jcaffe: building the oneDNN convolution kernels failed ({e}); "
                      f"convolutions run in pure JAX")


setup(
    ext_modules=[Extension(
        "jcaffe._onednn", ["jcaffe/csrc/onednn_conv.cc"], language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-Wno-attributes",
                            "-Wno-return-type"],
        optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
