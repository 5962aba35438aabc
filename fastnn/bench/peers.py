"""The other libraries: PyTorch (when it imports) and NumPy's BLAS (its kernel and thread count)."""
from __future__ import annotations

import ctypes
import os


def import_torch():
    """torch, or None when it does not import (any error: a broken install must not stop the bench)."""
    try:
        import torch
        return torch
    except Exception:
        return None


def torch_kernels(torch) -> dict:
    """The instruction sets PyTorch runs: ATen's CPU capability (torch.backends.cpu), and the limits put
    on its MKL and oneDNN by their environment variables (they cannot be asked)."""
    if torch is None:
        return {}
    kernels = {}
    try:
        kernels["aten"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    for name, var in (("mkl", "MKL_ENABLE_INSTRUCTIONS"), ("onednn", "ONEDNN_MAX_CPU_ISA")):
        if var in os.environ:
            kernels[name] = f"<= {os.environ[var]}"
    return kernels


def _openblas_functions():
    """ctypes functions of the OpenBLAS that NumPy loaded, those found of "set_num_threads",
    "get_num_threads" and "get_corename". Some builds decorate the names: NumPy's wheels ship
    scipy-openblas, whose symbols are scipy_openblas_*64_."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return {}
    found = {}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("set_num_threads", "get_num_threads", "get_corename"):
            for symbol in (f"openblas_{name}", f"scipy_openblas_{name}64_", f"openblas_{name}64_",
                           f"scipy_openblas_{name}"):
                fn = getattr(lib, symbol, None)
                if fn is not None:
                    found[name] = fn
                    break
        if found:
            break
    if "get_corename" in found:
        found["get_corename"].restype = ctypes.c_char_p
    return found


def blas_info(threads=None) -> dict:
    """NumPy's BLAS: library, kernel (core) name and thread count, after setting the thread count when
    `threads` is given (through threadpoolctl when installed, else OpenBLAS's own functions)."""
    info = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        if threads:
            threadpool_limits(threads, user_api="blas")   # stays in force: not used as a context
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info = {"library": pools[0].get("internal_api"), "core": pools[0].get("architecture"),
                    "threads": pools[0].get("num_threads")}
    except Exception:
        pass
    if info is None:
        fns = _openblas_functions()
        if threads and "set_num_threads" in fns:
            fns["set_num_threads"](ctypes.c_int(threads))
        info = {"library": "openblas" if fns else "unknown", "core": None, "threads": None}
        if "get_corename" in fns:
            info["core"] = fns["get_corename"]().decode(errors="replace").strip()
        if "get_num_threads" in fns:
            info["threads"] = int(fns["get_num_threads"]())
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if env:
        info["env"] = env
    return info
