"""GPU benchmark: every fastnn CUDA op against cuBLAS (through cupy, TF32 off), cupy's own element-wise and
reduction ops, and PyTorch (scaled_dot_product_attention, fused Adam) when it imports.

Each case is validated before it is timed (fastnn against a float64 or cuBLAS result), then timed by
fastnn.bench's GPU timer (`CudaEvents`: CUDA events, L2 flushed before every repetition, median of the
repetitions). Rates: GFLOP/s or TFLOP/s from
2*M*N*K (matmul), 4*B*H*L*S*E (attention; causal counts L*(L+1)/2 pairs); GB/s from bytes read + written
once. % limit: of the device-to-device copy bandwidth and of a large cuBLAS SGEMM / HGEMM measured here.

    CUPY_TF32=0 python bench/gpu_bench.py --out DIR [--quick]

writes DIR/gpu_bench.json after every case (a run stopped midway keeps the cases done) and, at the end,
DIR/gpu_bench.md, and prints the table. Without a usable GPU it exits with the reason.

Checks: float32 results within 1e-5 relative (norm), float16 within 2e-3, except where a result is stored
in float16 with a large dynamic range (the cross-entropy gradient (p - onehot) / N, whose small entries
fall into float16's subnormals): there the bound is the float16 rounding of the float64 result itself,
rounding_tol() below.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("CUPY_TF32", "0")  # before cupy is imported: cuBLAS SGEMM in true float32

import numpy as np  # noqa: E402

import fastnn  # noqa: E402
from fastnn.bench.timing import CudaEvents  # noqa: E402

cp = None     # cupy, imported by main() once a usable GPU is confirmed
torch = None  # optional baseline
timer = None  # CudaEvents(cp)


def import_gpu_modules():
    global cp, torch, timer
    import cupy
    cp = cupy
    timer = CudaEvents(cupy)
    try:
        import torch as t
        torch = t if t.cuda.is_available() else None
    except Exception:  # torch is optional
        torch = None


def _spacing(x, dtype, xp):
    """The spacing (ulp) of dtype at each |x| (float64 array), subnormals included."""
    fi = np.finfo(dtype)
    ax = xp.abs(x)
    e = xp.floor(xp.log2(xp.maximum(ax, float(fi.tiny))))
    return xp.exp2(xp.maximum(e, float(np.log2(fi.tiny))) - fi.nmant)


def rounding_tol(want, dtype, xp=np, arith=1e-5):
    """The relative-norm error bound of a result `want` (float64) computed in float32 and stored in dtype:
    half a spacing of dtype at each entry (round to nearest), plus `arith` relative for the float32
    arithmetic. For float16 results with tiny entries (subnormal spacing 2**-24) this is far above 2e-3."""
    want = xp.asarray(want, dtype=xp.float64)
    bound = 0.5 * _spacing(want, dtype, xp) + arith * xp.abs(want)
    return float(xp.linalg.norm(bound) / max(float(xp.linalg.norm(want)), 1e-300))


def self_test() -> int:
    """rounding_tol on the CPU: a float16 cross-entropy gradient shaped as in the bench, rounded from its
    float64 value, passes the bound (and would fail the flat 2e-3); float32 gets about 1e-5."""
    rng = np.random.default_rng(0)
    rows, cols = 16384, 1000
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float16).astype(np.float64)
    labels = rng.integers(0, cols, rows)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    p[np.arange(rows), labels] -= 1
    want = p / rows
    ok = True
    for dt in (np.float16, np.float32):
        got = want.astype(np.float32).astype(dt).astype(np.float64)  # float32 arithmetic, stored in dt
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        tol = rounding_tol(want, dt)
        print(f"self-test {np.dtype(dt).name} cross_entropy grad: error {err:.2e}, bound {tol:.2e}")
        ok &= err <= tol
    ok &= rounding_tol(want, np.float16) > 2e-3  # the flat float16 bound was wrong for this result
    return 0 if ok else 1


def timeit(fn, reps):
    """Median seconds per call of fn on the current stream (fastnn.bench's GPU timer: CUDA events, L2
    flushed before each repetition)."""
    return timer(fn, reps).median


def rel_err(got, want):
    got = cp.asarray(got, dtype=cp.float64)
    want = cp.asarray(want, dtype=cp.float64)
    return float(cp.linalg.norm(got - want) / max(float(cp.linalg.norm(want)), 1e-300))


def to_torch(x):
    return torch.as_tensor(x, device="cuda")


class Bench:
    def __init__(self, reps, out=None):
        self.reps = reps
        self.rows = []
        self.limits = {}
        self.out = out

    def save(self, meta=None):
        """DIR/gpu_bench.json with the rows so far (written whole, then renamed: never half a file)."""
        if self.out is None:
            return
        path = os.path.join(self.out, "gpu_bench.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"meta": meta or {"limits": self.limits, "complete": False}, "rows": self.rows}, f, indent=1)
        os.replace(path + ".tmp", path)

    def measure_limits(self):
        n = 1 << 28  # 1 GiB of float32 per buffer
        a, b = cp.ones(n // 4, cp.float32), cp.empty(n // 4, cp.float32)
        t = timeit(lambda: cp.copyto(b, a), self.reps)
        self.limits["copy_GBps"] = 2 * a.nbytes / t / 1e9
        for dt, key in ((cp.float32, "sgemm_TFLOPs"), (cp.float16, "hgemm_TFLOPs")):
            m = 8192
            x, y = cp.random.standard_normal((m, m), dtype=cp.float32).astype(dt), cp.random.standard_normal((m, m), dtype=cp.float32).astype(dt)
            t = timeit(lambda: cp.matmul(x, y), max(3, self.reps // 3))
            self.limits[key] = 2 * m**3 / t / 1e12
        del a, b

    def add(self, op, case, dtype, fn, err, tol, amount, unit, limit_key, baselines):
        """amount: FLOPs (unit TFLOP/s) or bytes (unit GB/s); baselines: {name: fn}."""
        t = timeit(fn, self.reps)
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        rate = amount / t / scale
        limit = self.limits.get(limit_key)
        row = {"op": op, "case": case, "dtype": dtype, "time_s": t, "rate": rate, "unit": unit,
               "pct_limit": (100 * rate / limit) if limit else None, "limit": limit_key,
               "check_rel_err": err, "check_ok": bool(err <= tol), "baselines": {}}
        for name, bfn in baselines.items():
            try:
                bt = timeit(bfn, self.reps)
                row["baselines"][name] = {"time_s": bt, "speedup": bt / t}
            except Exception as e:  # a baseline that does not run here is reported, not fatal
                row["baselines"][name] = {"error": f"{type(e).__name__}: {e}"}
        self.rows.append(row)
        self.save()
        print(f"{op:18s} {case:28s} {dtype:8s} {t * 1e3:9.3f} ms {rate:9.2f} {unit}  check {err:.1e}", file=sys.stderr)


def run(b: Bench, quick: bool):
    rng = cp.random.default_rng(0)
    big = 1 << 24 if quick else 1 << 26  # elements: 64M (256 MiB of float32) as in the speed goals

    # ---- element-wise ----
    for dt in ("float32", "float16"):
        x = rng.standard_normal(big, dtype=cp.float32).astype(dt)
        g = rng.standard_normal(big, dtype=cp.float32).astype(dt)
        y = cp.empty_like(x)
        err = rel_err(fastnn.relu(x), cp.maximum(x.astype(cp.float64), 0))
        base = {"cupy": lambda: cp.maximum(x, 0, out=y)}
        if torch:
            tx, ty = to_torch(x), to_torch(y)
            base["torch"] = lambda: torch.clamp_min(tx, 0, out=ty)
        b.add("relu", f"{big >> 20}M out=y", dt, lambda: fastnn.relu(x, out=y), err, 0, 2 * x.nbytes, "GB/s",
              "copy_GBps", base)
        err = rel_err(fastnn.relu_backward(g, x), cp.where(x > 0, g, 0).astype(cp.float64))
        b.add("relu_backward", f"{big >> 20}M", dt, lambda: fastnn.relu_backward(g, x, out=y), err, 0, 3 * x.nbytes,
              "GB/s", "copy_GBps", {"cupy": lambda: cp.multiply(g, x > 0, out=y)})
        del x, g, y

    # ---- softmax family ----
    cols = 1024
    rows = big // cols
    for dt in ("float32", "float16"):
        tol = 1e-5 if dt == "float32" else 2e-3
        x = (rng.standard_normal((rows, cols), dtype=cp.float32) * 3).astype(dt)
        x64 = x.astype(cp.float64)
        e = cp.exp(x64 - x64.max(axis=1, keepdims=True))
        sm = e / e.sum(axis=1, keepdims=True)
        y = cp.empty_like(x)

        def cupy_softmax():
            m = x.max(axis=1, keepdims=True)
            z = cp.exp(x - m)
            return z / z.sum(axis=1, keepdims=True)

        base = {"cupy": cupy_softmax}
        if torch:
            tx = to_torch(x)
            base["torch"] = lambda: torch.softmax(tx, dim=-1)
        b.add("softmax", f"({rows},{cols})", dt, lambda: fastnn.softmax(x, out=y), rel_err(fastnn.softmax(x), sm), tol,
              2 * x.nbytes, "GB/s", "copy_GBps", base)
        lbase = {"torch": (lambda: torch.log_softmax(tx, dim=-1))} if torch else {}
        b.add("log_softmax", f"({rows},{cols})", dt, lambda: fastnn.log_softmax(x, out=y),
              rel_err(fastnn.log_softmax(x), cp.log(sm)), tol, 2 * x.nbytes, "GB/s", "copy_GBps", lbase)
        g = rng.standard_normal((rows, cols), dtype=cp.float32).astype(dt)
        ys = sm.astype(dt)
        want = ys.astype(cp.float64) * (g - (g.astype(cp.float64) * ys).sum(axis=1, keepdims=True))
        b.add("softmax_backward", f"({rows},{cols})", dt, lambda: fastnn.softmax_backward(g, ys),
              rel_err(fastnn.softmax_backward(g, ys), want), 10 * tol, 3 * x.nbytes, "GB/s", "copy_GBps",
              {"cupy": lambda: ys * (g - (g * ys).sum(axis=1, keepdims=True))})
        labels = rng.integers(0, 1000, rows).astype(cp.int64)
        xc = x[:, :1000].copy()
        e = cp.exp(xc.astype(cp.float64) - xc.astype(cp.float64).max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        p[cp.arange(rows), labels] -= 1
        _, grad = fastnn.cross_entropy(xc, labels)
        cbase = {}
        if torch:
            txc, tl = to_torch(xc), to_torch(labels)
            cbase["torch fwd"] = lambda: torch.nn.functional.cross_entropy(txc, tl)
        # The gradient's small entries are float16 subnormals: the bound is float16 rounding of the result.
        want = p / rows
        b.add("cross_entropy", f"({rows},1000) incl. loss sync", dt, lambda: fastnn.cross_entropy(xc, labels),
              rel_err(grad, want), rounding_tol(want, np.dtype(dt), cp), 2 * xc.nbytes, "GB/s", "copy_GBps", cbase)
        del x, x64, e, sm, y, g, ys, want, p

    # ---- matmul / linear ----
    n = 2048 if quick else 4096
    for dt, lim, tol in (("float32", "sgemm_TFLOPs", 1e-5), ("float16", "hgemm_TFLOPs", 2e-3)):
        a = rng.standard_normal((n, n), dtype=cp.float32).astype(dt)
        w = rng.standard_normal((n, n), dtype=cp.float32).astype(dt)
        out = cp.empty((n, n), dt)
        err = rel_err(fastnn.matmul(a, w), cp.matmul(a.astype(cp.float64), w.astype(cp.float64)))
        base = {"cuBLAS (cupy)": lambda: cp.matmul(a, w, out=out)}
        if torch:
            ta, tw = to_torch(a), to_torch(w)
            torch.backends.cuda.matmul.allow_tf32 = False
            base["torch"] = lambda: torch.matmul(ta, tw)
        b.add("matmul", f"{n}^3", dt, lambda: fastnn.matmul(a, w, out=out), err, tol, 2 * n**3, "TFLOP/s", lim, base)
        bs, m = 32, 512
        a3 = rng.standard_normal((bs, m, m), dtype=cp.float32).astype(dt)
        w3 = rng.standard_normal((bs, m, m), dtype=cp.float32).astype(dt)
        err = rel_err(fastnn.matmul(a3, w3), cp.matmul(a3.astype(cp.float64), w3.astype(cp.float64)))
        b.add("matmul", f"({bs},{m},{m})@({bs},{m},{m})", dt, lambda: fastnn.matmul(a3, w3), err, tol, 2 * bs * m**3,
              "TFLOP/s", lim, {"cuBLAS (cupy)": lambda: cp.matmul(a3, w3)})
        x = rng.standard_normal((8192, 1024), dtype=cp.float32).astype(dt)
        wl = rng.standard_normal((1024, 4096), dtype=cp.float32).astype(dt)
        bias = rng.standard_normal(4096, dtype=cp.float32).astype(dt)
        want = cp.maximum(x.astype(cp.float64) @ wl.astype(cp.float64) + bias, 0)
        err = rel_err(fastnn.linear(x, wl, bias, activation="relu"), want)
        b.add("linear", "8192x1024->4096 +bias relu", dt, lambda: fastnn.linear(x, wl, bias, activation="relu"), err,
              tol, 2 * 8192 * 1024 * 4096, "TFLOP/s", lim,
              {"cuBLAS+cupy": lambda: cp.maximum(cp.matmul(x, wl) + bias, 0)})
        del a, w, out, a3, w3, x, wl

    # ---- attention ----
    shapes = [((4, 16, 2048, 64), "float16"), ((4, 16, 1024, 64), "float32")]
    if quick:
        shapes = [((2, 8, 1024, 64), "float16"), ((2, 8, 512, 64), "float32")]
    for (B, H, L, E), dt in shapes:
        q, k, v = (rng.standard_normal((B, H, L, E), dtype=cp.float32).astype(dt) for _ in range(3))
        for causal in (False, True):
            got = fastnn.scaled_dot_product_attention(q, k, v, is_causal=causal)
            s = (q.astype(cp.float32) @ k.astype(cp.float32).swapaxes(-1, -2)) / math.sqrt(E)
            if causal:
                s = cp.where(cp.tril(cp.ones((L, L), bool)), s, -cp.inf)
            s = cp.exp(s - s.max(axis=-1, keepdims=True))
            want = (s / s.sum(axis=-1, keepdims=True)) @ v.astype(cp.float32)
            err = rel_err(got, want)
            del s, want
            base = {}
            if torch:
                tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
                base["torch sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            pairs = L * (L + 1) / 2 if causal else L * L
            b.add("sdpa", f"({B},{H},{L},{E})" + (" causal" if causal else ""), dt,
                  lambda: fastnn.scaled_dot_product_attention(q, k, v, is_causal=causal), err,
                  2e-3 if dt == "float16" else 1e-5, 4 * B * H * pairs * E, "TFLOP/s",
                  "hgemm_TFLOPs" if dt == "float16" else "sgemm_TFLOPs", base)
        del q, k, v

    # ---- Adam ----
    for dt in ("float32", "float16"):
        n = big
        p = rng.standard_normal(n, dtype=cp.float32).astype(dt)
        g = rng.standard_normal(n, dtype=cp.float32).astype(dt)
        m, v = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
        p64, m64, v64 = p.astype(cp.float64), cp.zeros(n), cp.zeros(n)
        fastnn.adam_update(p, g, m, v, step=1, lr=1e-3)
        g64 = g.astype(cp.float64)
        m64 = 0.1 * g64
        v64 = 0.001 * g64 * g64
        p64 -= 1e-3 / 0.1 * m64 / (cp.sqrt(v64) / math.sqrt(0.001) + 1e-8)
        err = rel_err(p, p64)
        step = [1]

        def fast():
            step[0] += 1
            fastnn.adam_update(p, g, m, v, step=step[0], lr=1e-3)

        base = {}
        if torch and dt == "float32":
            tp = torch.nn.Parameter(to_torch(p.copy()))
            tp.grad = to_torch(g.copy())
            opt = torch.optim.Adam([tp], lr=1e-3, fused=True)
            base["torch fused Adam"] = opt.step
        nbytes = p.nbytes * 2 + g.nbytes + 4 * m.nbytes  # read p, g, m, v; write p, m, v
        b.add("adam_update", f"{n >> 20}M params", dt, fast, err, 1e-5 if dt == "float32" else 2e-3, nbytes, "GB/s",
              "copy_GBps", base)
        del p, g, m, v, p64, m64, v64, g64


GOALS = [  # (op, case prefix, dtype, kind, threshold): kind "limit" = % of the limit; else a baseline's speedup
    ("relu", "", "float32", "limit", 85), ("softmax", "", "float32", "limit", 85),
    ("adam_update", "", "float32", "limit", 85),
    ("matmul", "4096^3", "float32", "cuBLAS (cupy)", 0.8), ("matmul", "4096^3", "float16", "cuBLAS (cupy)", 0.7),
    ("sdpa", "(4,16,2048,64)", "float16", "torch sdpa", 0.7),
]


def markdown(rows, meta):
    lines = [f"# fastnn GPU benchmark, {meta['date']}", "",
             f"Device: {meta['device']} (CC {meta['compute_capability']}), driver {meta['driver']}; fastnn "
             f"{meta['fastnn']} (CUDA {meta['cuda_toolkit']}, archs {meta['cuda_architectures']}); cupy {meta['cupy']}; "
             f"torch {meta['torch']}", "",
             "Limits measured here: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["limits"].items()), "",
             "| op | case | dtype | fastnn | rate | % limit | baselines (time, fastnn speed-up) | check |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bl = "; ".join(f"{n} {v['time_s'] * 1e3:.3f} ms ({v['speedup']:.2f}x)" if "time_s" in v else f"{n}: {v['error']}"
                       for n, v in r["baselines"].items())
        pct = f"{r['pct_limit']:.0f}% {r['limit'].split('_')[0]}" if r["pct_limit"] is not None else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['time_s'] * 1e3:.3f} ms | {r['rate']:.2f} {r['unit']} "
                     f"| {pct} | {bl} | {'ok' if r['check_ok'] else 'FAIL'} ({r['check_rel_err']:.0e}) |")
    lines += ["", "Speed goals (issue 4):", ""]
    for op, case, dt, kind, thr in GOALS:
        hits = [r for r in rows if r["op"] == op and r["case"].startswith(case) and r["dtype"] == dt]
        for r in hits:
            if kind == "limit":
                val, ok = r["pct_limit"], r["pct_limit"] is not None and r["pct_limit"] >= thr
                lines.append(f"- {op} {r['case']} {dt}: {val:.0f}% of copy bandwidth (goal >= {thr}%): {'met' if ok else 'NOT met'}")
            else:
                s = r["baselines"].get(kind, {}).get("speedup")
                ok = s is not None and s >= thr
                lines.append(f"- {op} {r['case']} {dt}: {s if s is None else round(s, 2)}x {kind} (goal >= {thr}x): {'met' if ok else 'NOT met'}")
    lines += ["", "Times: medians of CUDA-event-timed calls with L2 flushed before each. TFLOP/s: matmul/linear "
              "2*M*N*K, sdpa 4*B*H*L*S*E (causal: L*(L+1)/2 pairs). GB/s: bytes read + written once (adam: p, g, m, v "
              "read; p, m, v written). % limit: of the device-to-device copy bandwidth or of an 8192^3 cuBLAS "
              "SGEMM (TF32 off) / HGEMM. speed-up: baseline time / fastnn time (> 1: fastnn faster).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_bench.md and gpu_bench.json")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    args = ap.parse_args()
    if not fastnn.cuda_is_available():
        sys.exit(f"gpu_bench: no usable GPU: {fastnn.info().get('cuda_unavailable_reason')}")
    import_gpu_modules()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    b = Bench(reps=5 if args.quick else 15, out=args.out)
    b.measure_limits()
    run(b, args.quick)
    info = fastnn.info()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": info.get("cuda_device"), "compute_capability": info.get("cuda_compute_capability"),
        "driver": info.get("cuda_driver"), "fastnn": info["version"], "cuda_toolkit": info.get("cuda_toolkit"),
        "cuda_architectures": ",".join(info.get("cuda_architectures", [])), "cupy": cp.__version__,
        "torch": torch.__version__ if torch else None, "python": platform.python_version(),
        "limits": b.limits, "seconds": round(time.time() - t0, 1), "quick": args.quick,
    }
    meta["complete"] = True
    md = markdown(b.rows, meta)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(md)
    b.save(meta)
    print(md)
    return 0 if all(r["check_ok"] for r in b.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
