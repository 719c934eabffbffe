"""Only what pyproject.toml cannot say: the CFFI extension, and its stable-ABI wheel tag."""

import platform
import sys
import sysconfig

from setuptools import setup

# cffi compiles the extension against the stable ABI (Py_LIMITED_API) on a regular CPython build,
# and the C code uses nothing else, so one wheel tagged cp310-abi3 serves CPython 3.10 and every
# later version. Not on a free-threaded or debug CPython, where cffi builds a version-specific module.
limited_api = (platform.python_implementation() == "CPython"
               and not sysconfig.get_config_var("Py_GIL_DISABLED")
               and not hasattr(sys, "gettotalrefcount"))

setup(
    cffi_modules=["csrc/build_cffi.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if limited_api else {},
)
