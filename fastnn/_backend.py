"""Array families and the CPU backend: which compute backend a call runs on and how its arrays get there.

A call's arrays all belong to one *family* (numpy, torch, JAX, cupy, any other DLPack or
__cuda_array_interface__ producer). The family says how an array is viewed, without a copy, as the
native array of a compute backend (numpy for the CPU kernels, cupy for the CUDA ones) and how a result goes
back to the caller's type. The *backend* (the CPU one here, the CUDA one in fastnn/_gpu.py) holds what
differs between compute devices: the float dtypes, allocation, the layout tests, the stream and which
compiled entry to call. The ops (fastnn/_ops.py) are written once against it.

Nothing here imports torch, JAX or cupy: a family is recognised by its type's module and attributes, and
its library is imported when such an array arrives.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import numpy as np

from . import _C

ACCEPTED = ("numpy.ndarray, torch.Tensor, jax.Array, cupy.ndarray, or any array exporting DLPack "
            "(__dlpack__) or __cuda_array_interface__")
_NULL = contextlib.nullcontext()


# ---- half precision on the CPU ------------------------------------------------------------------------

_F16 = np.dtype(np.float16)
# The largest finite value of each half dtype (np.finfo does not know ml_dtypes' bfloat16).
HALF_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def is_bf16(dtype) -> bool:
    """ml_dtypes.bfloat16, recognized by its name: ml_dtypes is imported only where such an array arrives."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def is_half(dtype) -> bool:
    """float16 or bfloat16: the dtypes the CPU stores in 16 bits and computes on in float32."""
    return dtype == _F16 or is_bf16(dtype)


class _CpuFloats:
    """The CPU's float dtypes: float32, float64, float16 and bfloat16 (by name, without importing ml_dtypes)."""

    _full = (np.dtype(np.float32), np.dtype(np.float64))

    def __contains__(self, dtype) -> bool:
        return dtype in self._full or is_half(dtype)


def widen(a):
    """A float32 copy (C-contiguous) of the float16 / bfloat16 array `a`: the compiled conversion."""
    if not (a.flags.c_contiguous and a.flags.aligned):
        a = np.ascontiguousarray(a)
        if not a.flags.aligned:
            a = a.copy()
    out = np.empty(a.shape, np.float32)
    if a.size:
        _C.half_to_float(a.reshape(-1).view(np.uint16), out.reshape(-1), is_bf16(a.dtype))
    return out


def _bits(a):
    """The uint16 view of a C-contiguous float16 / bfloat16 array's bits, flat."""
    return a.reshape(-1).view(np.uint16)


def narrow(f, out) -> None:
    """out (a C-contiguous float16 / bfloat16 array) = the float32 array f rounded to nearest even."""
    if out.size:
        _C.float_to_half(np.ascontiguousarray(f, np.float32).reshape(-1), out.reshape(-1).view(np.uint16),
                         is_bf16(out.dtype))


def bf16_dtype():
    """numpy's bfloat16 dtype (ml_dtypes.bfloat16), imported on first use."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes): it provides "
                        "numpy's bfloat16 dtype") from None
    return np.dtype(ml_dtypes.bfloat16)


# ---- the CPU backend ---------------------------------------------------------------------------------

class Cpu:
    """The CPU kernels (fastnn._C) on numpy arrays. `family` is None for numpy callers; for another CPU
    family (torch, JAX) it converts the results back, and `written` maps the native views of in-place
    arguments back to the caller's objects (so relu(x, out=y) returns y itself)."""

    xp = np
    float_dtypes = _CpuFloats()
    dtype_names = "float32, float64, float16 or bfloat16"
    kind = "CPU"  # the compute device, as messages name it

    def __init__(self, family=None):
        self.family = family
        # Another family's arrays, once viewed as numpy arrays, try the compiled fast paths (for numpy
        # callers the op has tried them already).
        self.fast = family is not None
        self.written = []  # (native, the caller's object) of the arrays written in place

    # -- layout and allocation --
    def scope(self):
        return _NULL

    @staticmethod
    def aligned(a) -> bool:
        return a.flags.aligned

    @staticmethod
    def writable(a) -> bool:
        return a.flags.writeable

    @staticmethod
    def address(a) -> int:
        return a.__array_interface__["data"][0]

    @staticmethod
    def offsets(offs: np.ndarray):
        return offs

    @staticmethod
    def moment_dtype(dtype):
        """The dtype of Adam's moments for parameters of `dtype`: the parameters' own on the CPU, float32 for
        float16 / bfloat16 parameters (mixed precision; half-precision moments are accepted too)."""
        return np.dtype(np.float32) if is_half(dtype) else dtype

    @staticmethod
    def moment_dtypes(dtype):
        """The moment dtypes accepted for parameters of `dtype`."""
        return (np.dtype(np.float32), dtype) if is_half(dtype) else (dtype,)

    @staticmethod
    def lse_dtype(dtype):
        """The dtype of attention's per-row log-sum-exp for inputs of `dtype`: theirs on the CPU, float32 for
        float16 / bfloat16 (a half-precision lse would shift whole probability rows in the backward)."""
        return np.dtype(np.float32) if is_half(dtype) else dtype

    # float16 / bfloat16 operands are widened to float32 (is_half / widen), the float32 kernels run, and
    # the results are rounded back to nearest even (narrow): every sum and dot product in float32.
    half = staticmethod(is_half)
    widen = staticmethod(widen)
    narrow = staticmethod(narrow)

    @staticmethod
    def bf16_dot(dtype) -> bool:
        """Whether attention (forward and backward) reads `dtype` operands without widening them: bfloat16
        on the avx512bf16 path (the AVX512-BF16 dot product)."""
        return is_bf16(dtype) and _C.bf16_attention()

    @staticmethod
    def causal_may_skip(arrays) -> bool:
        """Whether causal attention may skip the keys above the diagonal for these operands: always on the
        CPU, whose kernels check the rows a skipped block would involve (csrc/cpu/sdpa.cpp rows_finite)."""
        return True

    def wrap(self, r):
        """A result in the caller's array type."""
        if self.family is None:
            return r
        if type(r) is np.ndarray and not self.written:
            return self.family.back(r)
        return self.family.wrap(r, self.written)

    # -- the compiled entries --
    # float16 / bfloat16 element-wise, softmax and Adam kernels read and write the 16-bit arrays themselves
    # (uint16 views of their bits) and compute in float32.
    @staticmethod
    def relu(x, y):
        if is_half(x.dtype):
            return _C.half_relu(_bits(x), _bits(y), is_bf16(x.dtype))
        _C.relu(x, y)

    @staticmethod
    def relu_backward(g, x, y):
        if is_half(x.dtype):
            return _C.half_relu_backward(_bits(g), _bits(x), _bits(y), is_bf16(x.dtype))
        _C.relu_backward(g, x, y)

    @staticmethod
    def softmax(x, y, log: bool):
        if is_half(x.dtype):
            return _C.half_softmax(_bits(x), _bits(y), x.shape[-1], log, is_bf16(x.dtype))
        _C.softmax(x, y, x.shape[-1], log)

    @staticmethod
    def softmax_backward(g, y, out, log: bool):
        if is_half(y.dtype):
            return _C.half_softmax_backward(_bits(g), _bits(y), _bits(out), y.shape[-1], log, is_bf16(y.dtype))
        _C.softmax_backward(g, y, out, y.shape[-1], log)

    @staticmethod
    def cross_entropy(logits, labels, grad, scale, ignore_index, rows) -> float:
        """Writes grad = (softmax - onehot) * scale (zero rows where the label is ignore_index) and, when
        `rows` is an array, the per-row losses into it; returns the summed loss."""
        if is_half(logits.dtype):
            g32 = np.empty(grad.shape, np.float32)
            r32 = None if rows is None else np.zeros(rows.shape, np.float32)
            loss = _C.cross_entropy(widen(logits), labels, g32, logits.shape[1], scale, ignore_index, r32)
            narrow(g32, grad)
            if rows is not None:
                narrow(r32, rows)
            return loss
        return _C.cross_entropy(logits, labels, grad, logits.shape[1], scale, ignore_index, rows)

    @staticmethod
    def gemm(a, b, buf, a_off, b_off, M, N, K, ea, eb, bias, relu):
        _C.gemm(a, b, buf, a_off, b_off, M, N, K, ea[-2], ea[-1], eb[-2], eb[-1], bias, relu, False)

    @staticmethod
    def gemm_half(a, b, c32, a_off, b_off, M, N, K, ea, eb, bias32, relu):
        """c32 (float32) = a @ b for float16 / bfloat16 a, b of any strides, widened while packing."""
        _C.gemm_half(a.view(np.uint16), b.view(np.uint16), c32, a_off, b_off, M, N, K, ea[-2], ea[-1], eb[-2],
                     eb[-1], bias32, relu, is_bf16(a.dtype))

    @staticmethod
    def sdpa(at, out, lse, drop):
        if is_half(out.dtype):  # the plan widened a float mask, and q, k, v unless bf16_dot; lse is float32
            o32 = np.empty(out.shape, np.float32)
            if is_half(at.q.dtype):  # bfloat16 on the dot product; an operand out of its range: widened after all
                q, k, v = (a.view(np.uint16) for a in (at.q, at.k, at.v))  # the operands' strides and offsets
                if _C.sdpa_bf16(q, k, v, o32, at.q_off, at.k_off, at.v_off, at.L, at.S, at.E, at.Ev, *at.rows,
                                at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale, lse, drop):
                    return narrow(o32, out)
                at.plan()
            _C.sdpa(at.q, at.k, at.v, o32, at.q_off, at.k_off, at.v_off, at.L, at.S, at.E, at.Ev, *at.rows,
                    at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale, lse, drop)
            return narrow(o32, out)
        _C.sdpa(at.q, at.k, at.v, out, at.q_off, at.k_off, at.v_off, at.L, at.S, at.E, at.Ev, *at.rows,
                at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale, lse, drop)

    def sdpa_backward(self, at, g, o, lse, matmul, drop):
        """Per-head (dq, dk, dv), batch + core shapes, from the fused flash-style kernel."""
        nb = at.nbatch
        # float16 / bfloat16: float32 gradients (at.reduce_to sums heads in float32, then rounds)
        dt = np.float32 if is_half(at.dtype) else at.dtype
        dq = np.zeros(at.batch + (at.L, at.E), dt)
        dk = np.zeros(at.batch + (at.S, at.E), dt)
        dv = np.zeros(at.batch + (at.S, at.Ev), dt)
        if not at.empty() and at.S:
            if is_half(at.q.dtype):  # bfloat16 on the dot product (plan(dot=True)); given up: widened after all
                bits = (lambda a: contiguous(self, a).reshape(nb, at.L, at.Ev).view(np.uint16))
                q, k, v = (a.view(np.uint16) for a in (at.q, at.k, at.v))
                if _C.sdpa_backward_bf16(q, k, v, at.q_off, at.k_off, at.v_off, at.L, at.S, at.E, at.Ev, *at.rows,
                                         at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale, bits(g), bits(o),
                                         contiguous(self, lse).reshape(nb, at.L), dq.reshape(nb, at.L, at.E),
                                         dk.reshape(nb, at.S, at.E), dv.reshape(nb, at.S, at.Ev), drop):
                    return dq, dk, dv
                at.plan()
            c = (lambda bk, a: widen(a) if is_half(a.dtype) else contiguous(bk, a)) if dt != at.dtype else contiguous
            _C.sdpa_backward(at.q, at.k, at.v, at.q_off, at.k_off, at.v_off, at.L, at.S, at.E, at.Ev, *at.rows,
                             at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale,
                             c(self, g).reshape(nb, at.L, at.Ev), c(self, o).reshape(nb, at.L, at.Ev),
                             c(self, lse).reshape(nb, at.L), dq.reshape(nb, at.L, at.E),
                             dk.reshape(nb, at.S, at.E), dv.reshape(nb, at.S, at.Ev), drop)
        return dq, dk, dv

    @staticmethod
    def adam(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, decoupled, maximize):
        if is_half(p.dtype):
            if m.dtype != v.dtype or (vmax is not None and vmax.dtype != m.dtype):  # mixed moments: rare
                m32, v32 = (x if x.dtype == np.float32 else widen(x) for x in (m, v))
                vmax32 = None if vmax is None else vmax if vmax.dtype == np.float32 else widen(vmax)
                p32 = widen(p)
                _C.adam(p32, widen(g), m32, v32, vmax32, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
                        decoupled, maximize)
                for x, x32 in ((p, p32), (m, m32), (v, v32), (vmax, vmax32)):
                    if x is not None and x32 is not x:
                        narrow(x32, x)
                return
            if m.dtype != np.float32:
                m, v, vmax = (None if x is None else _bits(x) for x in (m, v, vmax))
            return _C.half_adam(_bits(p), _bits(g), m, v, vmax, lr, beta1, beta2, eps, weight_decay, step_size,
                                bc2_sqrt, decoupled, maximize, is_bf16(p.dtype))
        _C.adam(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, decoupled, maximize)


CPU = Cpu()


def contiguous(bk, a):
    """a as a C-contiguous array aligned for its dtype: a itself when it is, else a copy. (A view at an odd
    byte offset is C-contiguous to NumPy, and np.ascontiguousarray keeps it, but the kernels need aligned
    elements: misaligned loads are undefined behaviour in C++, and vectorized loops assume alignment.)"""
    return a if a.flags.c_contiguous and bk.aligned(a) else bk.xp.array(a, order="C")


# ---- array families ----------------------------------------------------------------------------------

class Family:
    """How one array type reaches a compute backend (`native`) and how results go back (`back`)."""

    name = "array"
    readonly = False  # its arrays can never be written (in-place ops refuse them)

    def __init__(self, name: str, gpu: bool):
        self.name, self.gpu = name, gpu

    def backend(self, op: str):
        if self.gpu:
            from . import _gpu
            return _gpu.Cuda(op, self)
        return Cpu(self)

    def native(self, x):
        raise NotImplementedError

    def back(self, a):
        return a

    def wrap(self, r, written):
        """Result `r` (tuples element-wise; floats and None unchanged) in the caller's type: an array written
        in place is the caller's own object (`written`: (native view, caller's array) pairs)."""
        if isinstance(r, tuple):
            return tuple(self.wrap(x, written) for x in r)
        if r is None or isinstance(r, float):
            return r
        for native, original in written:
            if r is native:
                return original
        return self.back(r)

    def stream(self, device: int):
        """The CUDA stream (a raw pointer) the caller's library computes on for device `device` (an index);
        None: cupy's current stream."""
        return None


def _lib(name: str):
    return sys.modules.get(name) or importlib.import_module(name)


class _Numpy(Family):
    # A subclass is read as its base ndarray (the same memory: writes reach it), so that np.matrix's 2-D
    # rules do not leak into the results, which are plain ndarrays (but out= returns the caller's object).
    # A masked array is refused where it arrives (adopt): the kernels would read the masked-out values.
    def native(self, x):
        return np.asarray(x)


class _TorchCpu(Family):
    # Tensor.numpy() and torch.from_numpy are the fastest zero-copy routes (about 1 us each; np.from_dlpack
    # takes 3). detach(): autograd belongs to the PyTorch integration, here a tensor is read as data.
    def native(self, x):
        x = x.detach() if x.requires_grad else x
        if x.dtype is _lib("torch").bfloat16:  # numpy has no bfloat16: the bits, viewed as ml_dtypes' one
            return x.view(_lib("torch").int16).numpy().view(bf16_dtype())
        return x.numpy()

    def back(self, a):
        if is_bf16(a.dtype):
            torch = _lib("torch")
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return _from_numpy(a)


class _TorchCuda(Family):
    def native(self, x):
        return _lib("cupy").from_dlpack(x.detach())

    def back(self, a):
        return _lib("torch").from_dlpack(a)

    def stream(self, device: int):
        return _lib("torch").cuda.current_stream(device).cuda_stream  # the arrays' device, not torch's current one


class _Cupy(Family):
    def native(self, x):
        return x


class _CudaInterface(Family):  # any other __cuda_array_interface__ object: cupy arrays come back
    def native(self, x):
        return _lib("cupy").asarray(x)


class _DLPack(Family):
    """Any other DLPack producer (JAX among them): numpy (CPU) or cupy (CUDA) views in, results back
    through its library's `from_dlpack` (numpy / cupy arrays when it has none)."""

    def __init__(self, name: str, gpu: bool, module: str, readonly: bool = False):
        super().__init__(name, gpu)
        self.module, self.readonly = module, readonly

    def native(self, x):
        if self.gpu:
            return _lib("cupy").from_dlpack(x)
        try:
            return np.from_dlpack(x)
        except (RuntimeError, BufferError, TypeError):
            if self.module == "jax" and getattr(x.dtype, "name", "") == "bfloat16":
                return np.asarray(x)  # DLPack has no numpy bfloat16; JAX's __array__ is an ml_dtypes view
            raise

    def back(self, a):
        lib = _lib(self.module)
        from_dlpack = getattr(lib, "from_dlpack", None)
        if from_dlpack is None and self.module == "jax":
            from_dlpack = _lib("jax.numpy").from_dlpack
        if from_dlpack is None:
            return a
        if is_bf16(a.dtype) and self.module == "jax":
            return _lib("jax.numpy").asarray(a)  # numpy cannot export bfloat16 through DLPack
        return from_dlpack(a if a.flags.c_contiguous else a.copy())


NUMPY = _Numpy("numpy.ndarray", False)
_TORCH = (_TorchCpu("torch.Tensor (CPU)", False), _TorchCuda("torch.Tensor (CUDA)", True))
_CUPY = _Cupy("cupy.ndarray", True)
_CAI = _CudaInterface("GPU array (__cuda_array_interface__)", True)
_JAX = (_DLPack("jax.Array", False, "jax", readonly=True), _DLPack("jax.Array (GPU)", True, "jax", readonly=True))
_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA; kDLCPU is 1
_dlpack_families: dict = {}


class _TorchCpuCall(Cpu):
    """The CPU backend of the commonest foreign call (plain torch CPU tensors, none written in place),
    one shared instance: a result array goes straight back through torch.from_numpy."""

    def wrap(self, r):
        return _from_numpy(r) if type(r) is np.ndarray else self.family.wrap(r, ())


_TORCH_CPU_BACKEND = _TorchCpuCall(_TORCH[0])
_torch_tensor = None  # torch.Tensor once one has been seen (a cheaper test than the module name)
_parameter = None     # torch.nn.Parameter, likewise
_from_numpy = None    # torch.from_numpy, likewise


def torch_view(x):
    """The numpy view of `x` when it is a torch CPU tensor (or Parameter) numpy can read as plain data, else
    None: the ops' fast path for torch tensors, tried right after the numpy one (anything it declines goes
    through adopt(), which explains). Tensor.numpy() is zero-copy and keeps the strides; it refuses CUDA
    tensors, the conj and neg bits and the dtypes numpy lacks. A tensor that requires grad is read as its
    detach() (autograd belongs to the PyTorch integration)."""
    t = type(x)
    if t is _torch_tensor or t is _parameter:
        try:
            return (x.detach() if x.requires_grad else x).numpy()
        except (TypeError, RuntimeError):
            pass
    return None


def _torch_cpu(arrays: dict, writes):
    """adopt() for a call of plain torch CPU tensors (those torch_view reads): (backend, natives), or None
    for anything else, which the general path then handles (and explains)."""
    natives = []
    written = None
    for name, v in arrays.items():
        if v is None and name in OPTIONAL:
            natives.append(None)
            continue
        a = torch_view(v)
        if a is None:
            return None
        if name in writes:
            written = (written or []) + [(a, v)]
        natives.append(a)
    if written is None:
        return _TORCH_CPU_BACKEND, natives
    bk = Cpu(_TORCH[0])
    bk.written = written
    return bk, natives


def family_of(x):
    """The family of `x`, or None when it is no array fastnn accepts."""
    global _torch_tensor, _parameter, _from_numpy
    t = type(x)
    if t is _torch_tensor:
        return _TORCH[x.is_cuda]
    if t is np.ndarray or isinstance(x, np.ndarray):
        return NUMPY
    root = t.__module__.partition(".")[0]
    if root == "torch" and hasattr(x, "is_cuda") and hasattr(x, "numpy"):
        torch = _lib("torch")
        _torch_tensor, _parameter, _from_numpy = torch.Tensor, torch.nn.Parameter, torch.from_numpy
        return _TORCH[bool(x.is_cuda)]
    if root == "cupy":
        return _CUPY
    if root in ("jax", "jaxlib") and hasattr(x, "__dlpack__"):
        return _JAX[_dlpack_device(x) == _DLPACK_CUDA]
    if hasattr(x, "__cuda_array_interface__"):
        return _CAI
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        gpu = _dlpack_device(x) == _DLPACK_CUDA
        key = (root, gpu)
        if key not in _dlpack_families:
            _dlpack_families[key] = _DLPack(f"{root} array{' (CUDA)' if gpu else ''}", gpu, root)
        return _dlpack_families[key]
    return None


def _dlpack_device(x) -> int:
    try:
        return int(x.__dlpack_device__()[0])
    except Exception:
        return 0


def not_an_array(name: str, x) -> TypeError:
    return TypeError(f"{name}: expected an array ({ACCEPTED}), got {type(x).__name__}")


OPTIONAL = frozenset(("out", "bias", "attn_mask", "max_exp_avg_sq"))  # arguments that may be None


def adopt(op: str, arrays: dict, writes=()):
    """(backend, [native arrays]) for one call: `arrays` maps argument names to the caller's arrays (None
    for an absent OPTIONAL one) and `writes` names those the op writes in place. All must be of one family
    (else a TypeError naming both); a read-only family in a written argument is a ValueError. A NumPy
    subclass is read as its base ndarray (results are plain ndarrays, out= returns the caller's object); a
    masked array is a TypeError."""
    values = arrays.values()
    for v in values:
        if type(v) is not np.ndarray:
            break
    else:
        return CPU, list(values)
    if type(v) is _torch_tensor:
        found = _torch_cpu(arrays, writes)
        if found is not None:
            return found
    first = family = None
    subclass = False  # a NumPy subclass among the arguments (read through _Numpy.native below)
    for name, v in arrays.items():
        if v is None and name in OPTIONAL:
            continue
        f = family_of(v)
        if f is None:
            raise not_an_array(name, v)
        if f is NUMPY and type(v) is not np.ndarray:
            ma = sys.modules.get("numpy.ma")  # (a masked array exists only once numpy.ma is loaded)
            if ma is not None and isinstance(v, ma.MaskedArray):
                raise TypeError(f"{name}: got a numpy masked array, whose mask fastnn would ignore; pass "
                                f"{name}.filled(value) or {name}.data")
            subclass = True
        if family is None:
            first, family = name, f
        elif f is not family:
            raise TypeError(f"{name}: got a {f.name} in a call whose {first} is a {family.name}; pass the arrays "
                            "of one call as one array type")
    if family is None or family is NUMPY and not subclass:
        return CPU, list(values)
    if family.readonly:
        for name in writes:
            if arrays.get(name) is not None:
                raise ValueError(f"{name}: {family.name}s are read-only, and {op} writes {name} in place; "
                                 "use the returned value instead (or numpy / torch arrays)")
    bk = family.backend(op)
    natives = []
    native = family.native
    for name, v in arrays.items():
        if v is None:
            natives.append(None)
            continue
        try:
            a = native(v)
        except (TypeError, RuntimeError, BufferError, ValueError) as e:
            raise TypeError(f"{name}: this {family.name} cannot be viewed as a {bk.kind} array: {e}") from None
        if family.gpu:
            bk.claim(a, name)
        if name in writes:
            bk.written.append((a, v))
        natives.append(a)
    return bk, natives
