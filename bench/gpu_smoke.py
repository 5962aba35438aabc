"""Every CUDA kernel once on small, awkward shapes (fast and plain variants, float32 and float16), checked
loosely against NumPy. Small enough to run under compute-sanitizer (memcheck, racecheck): see gpu_check.sh.
Exits non-zero on a wrong result or a CUDA error.

    python bench/gpu_smoke.py [--no-pool]

--no-pool turns cupy's memory pool off (cupy.cuda.set_allocator(None)): every array is then its own
cudaMalloc, so a sanitizer sees its exact bounds (inside the pool, an overrun lands in rounded or carved
blocks and goes unnoticed).
"""
import sys

import numpy as np

import fastnn
from fastnn import _gpu
from fastnn import reference as ref

if not fastnn.cuda_is_available():
    sys.exit(f"gpu_smoke: no usable GPU: {fastnn.info().get('cuda_unavailable_reason')}")
import cupy as cp  # noqa: E402

if "--no-pool" in sys.argv[1:]:
    cp.cuda.set_allocator(None)

rng = np.random.default_rng(0)
failures = []


def close(name, got, want, tol):
    got = cp.asnumpy(got).astype(np.float64) if isinstance(got, cp.ndarray) else np.float64(got)
    want = np.asarray(want, np.float64)
    fin = np.isfinite(want)
    err = np.linalg.norm((got - want)[fin]) / max(np.linalg.norm(want[fin]), 1e-30)
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.2e} > {tol:.0e}")


for plain in (False, True):
    for dt in (np.float32, np.float16):
        tol = 1e-5 if dt == np.float32 else 3e-3
        tag = f"{'plain' if plain else 'fast'}/{np.dtype(dt).name}"
        with _gpu.plain_kernels(plain):
            x = rng.standard_normal((37, 1030)).astype(dt)
            g = rng.standard_normal((37, 1030)).astype(dt)
            gx, gg = cp.asarray(x), cp.asarray(g)
            close(f"relu {tag}", fastnn.relu(gx[:, 1:]), ref.relu(x[:, 1:].astype(np.float64)), tol)
            close(f"relu_backward {tag}", fastnn.relu_backward(gg, gx), ref.relu_backward(g.astype(float), x.astype(float)), tol)
            for cols in (33, 1030):
                xs = x[:, :cols].astype(np.float64)
                close(f"softmax {tag} {cols}", fastnn.softmax(gx[:, :cols]), ref.softmax(xs), tol)
                close(f"log_softmax {tag} {cols}", fastnn.log_softmax(gx[:, :cols]), ref.log_softmax(xs), tol)
                y = ref.softmax(xs).astype(dt)
                close(f"softmax_backward {tag} {cols}", fastnn.softmax_backward(gg[:, :cols], cp.asarray(y)),
                      ref.softmax_backward(g[:, :cols].astype(float), y.astype(float)), 10 * tol)
                fastnn.log_softmax_backward(gg[:, :cols], cp.asarray(np.log(y + 1e-3).astype(dt)))
                labels = rng.integers(0, cols, 37)
                loss, grad = fastnn.cross_entropy(gx[:, :cols], cp.asarray(labels))
                want_loss, want_grad = ref.cross_entropy(xs, labels)
                close(f"cross_entropy {tag} {cols}", grad, want_grad, tol)
                close(f"cross_entropy loss {tag} {cols}", loss, want_loss, tol)
            a = rng.standard_normal((3, 131, 67)).astype(dt)
            b = rng.standard_normal((67, 129)).astype(dt)
            close(f"matmul {tag}", fastnn.matmul(cp.asarray(a), cp.asarray(b)), a.astype(float) @ b.astype(float), tol)
            a2 = rng.standard_normal((130, 64)).astype(dt)
            b2 = rng.standard_normal((64, 136)).astype(dt)
            bias = rng.standard_normal(136).astype(dt)
            close(f"linear {tag}", fastnn.linear(cp.asarray(a2), cp.asarray(b2), cp.asarray(bias), activation="relu"),
                  ref.linear(a2.astype(float), b2.astype(float), bias.astype(float), "relu"), tol)
            close(f"matmul transposed {tag}", fastnn.matmul(cp.asarray(b2).T, cp.asarray(a2).T),
                  b2.T.astype(float) @ a2.T.astype(float), tol)
            q = rng.standard_normal((2, 4, 70, 40)).astype(dt)
            k = rng.standard_normal((2, 2, 90, 40)).astype(dt)
            v = rng.standard_normal((2, 2, 90, 24)).astype(dt)
            mask = rng.random((70, 90)) > 0.3
            mask[3] = False
            for kw in ({"is_causal": True}, {"attn_mask": mask}):
                gkw = {kk: (cp.asarray(vv) if isinstance(vv, np.ndarray) else vv) for kk, vv in kw.items()}
                close(f"sdpa {tag} {list(kw)}",
                      fastnn.scaled_dot_product_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), enable_gqa=True, **gkw),
                      ref.scaled_dot_product_attention(q.astype(float), k.astype(float), v.astype(float), enable_gqa=True, **kw),
                      tol)
                # the backward (composed of the CUDA matmul and cupy ops) against the CPU kernel in float64
                q64, k64, v64 = q.astype(float), k.astype(float), v.astype(float)
                o, lse = fastnn.scaled_dot_product_attention(q64, k64, v64, enable_gqa=True, return_lse=True, **kw)
                go = rng.standard_normal(o.shape)
                want = fastnn.scaled_dot_product_attention_backward(go, q64, k64, v64, o, lse, enable_gqa=True, **kw)
                got = fastnn.scaled_dot_product_attention_backward(
                    cp.asarray(go.astype(dt)), cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(o.astype(dt)),
                    cp.asarray(lse.astype(np.float32)), enable_gqa=True, **gkw)
                for name, g_, w_ in zip("qkv", got, want):
                    close(f"sdpa_backward d{name} {tag} {list(kw)}", g_, w_, 20 * tol)
            gx, gw, gb = fastnn.linear_backward(cp.asarray(b2[:, :64].T.copy()), cp.asarray(a2[:64]), cp.asarray(b2[:, :64]))
            wx, ww, wb = fastnn.linear_backward(b2[:, :64].T.astype(float), a2[:64].astype(float), b2[:, :64].astype(float))
            for name, g_, w_ in (("x", gx, wx), ("weight", gw, ww), ("bias", gb, wb)):
                close(f"linear_backward d{name} {tag}", g_, w_, tol)
            n = 1003
            p = rng.standard_normal(n).astype(dt)
            gr = rng.standard_normal(n).astype(dt)
            gp, gm, gv, gvm = cp.asarray(p), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
            rp, rm, rv, rvm = p.astype(float), np.zeros(n), np.zeros(n), np.zeros(n)
            for step in (1, 2):
                fastnn.adam_update(gp, cp.asarray(gr), gm, gv, step=step, lr=1e-2, weight_decay=0.1, max_exp_avg_sq=gvm)
                ref.adam_update(rp, gr.astype(float), rm, rv, step=step, lr=1e-2, weight_decay=0.1, max_exp_avg_sq=rvm)
            close(f"adam {tag}", gp, rp, tol)
            gparams = [cp.asarray(p), cp.asarray(p[:7])]
            opt = fastnn.Adam(gparams, lr=1e-2, amsgrad=True)
            opt.step([cp.asarray(gr), cp.asarray(gr[:7])])
            opt.load_state_dict(opt.state_dict())
cp.cuda.Device().synchronize()
if failures:
    sys.exit("gpu_smoke FAILED:\n  " + "\n  ".join(failures))
print("gpu_smoke: every kernel ran and matched NumPy")
