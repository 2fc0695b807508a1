"""Build the Cython core. Everything else lives in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

_FLAGS = ["-O2"]
extensions = [
    # zlib: permessage-deflate on WebSocket (RFC 7692)
    Extension("zim._codec", ["zim/_codec.pyx"], extra_compile_args=_FLAGS, libraries=["z"]),
    Extension("zim._idmap", ["zim/_idmap.pyx"], extra_compile_args=_FLAGS),
    Extension("zim._tables", ["zim/_tables.pyx"], extra_compile_args=_FLAGS),
    Extension("zim._names", ["zim/_names.pyx"], extra_compile_args=_FLAGS),
    # one extension: zim/_core.pyx includes the concept files of zim/core/ (declared in the
    # .pxd files there and gathered by zim/_core.pxd); C headers are declared in zim/includes/
    Extension("zim._core", ["zim/_core.pyx"], extra_compile_args=_FLAGS),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
