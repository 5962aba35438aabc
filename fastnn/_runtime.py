"""Which shared libraries the compiled extension actually runs on (for fastnn.info()): asked of the dynamic
loader, so a wheel reports the libgomp it bundles in fastnn.libs/ and a source build the system one."""
from __future__ import annotations

import ctypes
import os


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _dladdr():
    # glibc >= 2.34 has dladdr in libc; older ones in libdl.
    for name in (None, "libdl.so.2"):
        try:
            f = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError):
            continue
        f.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        f.restype = ctypes.c_int
        return f
    return None


def library_providing(module_file: str, symbol: str) -> str | None:
    """Path of the library that resolves `symbol` for the already-loaded shared object `module_file`
    (dlsym through the module's handle searches the module and then its dependencies), or None."""
    try:
        handle = ctypes.CDLL(module_file, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
        address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    dladdr = _dladdr()
    found = _DlInfo()
    if dladdr is None or not dladdr(address, ctypes.byref(found)) or not found.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(found.dli_fname))


def openmp_runtime(module_file: str) -> str | None:
    """The OpenMP runtime library (libgomp, libomp, ...) the module's kernels use, or None without OpenMP."""
    return library_providing(module_file, "omp_get_max_threads")
