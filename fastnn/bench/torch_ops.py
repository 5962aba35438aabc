"""Speed of fastnn.torch against the torch functions it replaces (not a test): each op forward and
forward+backward at 1 and 2 threads, an optimizer step over 100 tensors of 10,000 elements against
torch.optim.AdamW(fused=True) and (foreach=True), and the per-call overhead on a tiny tensor with the size
where fastnn starts to win. Every case is validated against torch before it is timed.

    fastnn bench --op torch [--quick] [--threads 1,2]   (or python -m fastnn.bench.torch_ops)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastnn
import fastnn.torch as ft



def timeit(fn, min_time=0.2, repeats=5) -> float:
    """Median seconds per call over `repeats` runs of enough calls to last min_time / repeats each."""
    fn()
    n, t0 = 1, time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time / repeats / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def _cases(quick: bool):
    """(name, shape text, make_inputs, fastnn fn, torch fn); fns take the inputs and return a tensor."""
    s = 2 if quick else 1
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n, d = 2048 // s, 512 // s
    tgt = torch.randint(0, 1000, (4096 // s,), generator=g)
    return [
        ("linear", f"({n},{d})x({d},{d})", lambda: [r(n, d), r(d, d), r(d)],
         lambda x, w, b: ft.linear(x, w, b), lambda x, w, b: F.linear(x, w, b)),
        ("linear+relu", f"({n},{d})x({d},{d})", lambda: [r(n, d), r(d, d), r(d)],
         lambda x, w, b: ft.linear(x, w, b, activation="relu"), lambda x, w, b: F.relu(F.linear(x, w, b))),
        ("matmul", f"({d},{d})x({d},{d})", lambda: [r(d, d), r(d, d)], ft.matmul, torch.matmul),
        ("relu", f"({2**20 // s},)", lambda: [r(2**20 // s)], ft.relu, F.relu),
        ("softmax", f"({4096 // s},1000)", lambda: [r(4096 // s, 1000)], lambda x: ft.softmax(x, -1),
         lambda x: F.softmax(x, -1)),
        ("log_softmax", f"({4096 // s},1000)", lambda: [r(4096 // s, 1000)], lambda x: ft.log_softmax(x, -1),
         lambda x: F.log_softmax(x, -1)),
        ("cross_entropy", f"({4096 // s},1000)", lambda: [r(4096 // s, 1000)], lambda x: ft.cross_entropy(x, tgt),
         lambda x: F.cross_entropy(x, tgt)),
        ("sdpa causal", f"(4,8,{512 // s},64)", lambda: [r(4, 8, 512 // s, 64) for _ in range(3)],
         lambda q, k, v: ft.scaled_dot_product_attention(q, k, v, is_causal=True),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    ]


def op_rows(threads, quick):
    rows = []
    for name, shape, make, fast, ref in _cases(quick):
        for nt in threads:
            fastnn.set_num_threads(nt)
            torch.set_num_threads(nt)
            inputs = make()
            torch.testing.assert_close(fast(*inputs), ref(*inputs), rtol=1e-3, atol=1e-3)  # validate first
            t_fast, t_ref = timeit(lambda: fast(*inputs)), timeit(lambda: ref(*inputs))
            grads_in = [x.detach().requires_grad_() for x in inputs]

            def fwd_bwd(fn):
                def call():
                    for x in grads_in:
                        x.grad = None
                    out = fn(*grads_in)
                    out.backward(torch.ones_like(out))
                return call

            tb_fast, tb_ref = timeit(fwd_bwd(fast)), timeit(fwd_bwd(ref))
            rows.append((name, shape, nt, t_fast, t_ref, tb_fast, tb_ref))
    return rows


def optimizer_rows(threads, quick):
    count, size = (50, 10_000) if quick else (100, 10_000)
    makers = (("fastnn.torch.AdamW", lambda p: ft.AdamW(p, lr=1e-3)),
              ("torch AdamW fused=True", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
              ("torch AdamW foreach=True", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)))

    def setup(make):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(size, generator=g).requires_grad_() for _ in range(count)]
        for p in params:
            p.grad = torch.randn(size, generator=g)
        return params, make(params)

    # validate first: one step of each from the same start gives the same parameters
    firsts = []
    for _, make in makers:
        params, opt = setup(make)
        opt.step()
        firsts.append(params)
    for other in firsts[1:]:
        for a, b in zip(firsts[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows = []
    for nt in threads:
        fastnn.set_num_threads(nt)
        torch.set_num_threads(nt)
        for label, make in makers:
            _, opt = setup(make)
            rows.append((label, f"{count} x {size}", nt, timeit(opt.step)))
    return rows


def overhead_rows(quick):
    fastnn.set_num_threads(1)
    torch.set_num_threads(1)
    rows = []
    tiny = torch.randn(8)
    arr = tiny.numpy()
    rows.append(("fastnn.torch.relu (custom op)", timeit(lambda: ft.relu(tiny))))
    rows.append(("torch.ops.fastnn.relu (op only)", timeit(lambda: torch.ops.fastnn.relu(tiny))))
    rows.append(("F.relu (torch)", timeit(lambda: F.relu(tiny))))
    rows.append(("fastnn.relu (numpy)", timeit(lambda: fastnn.relu(arr))))
    with ft.patched():
        rows.append(("patched F.relu", timeit(lambda: F.relu(tiny))))
    crossover = {}
    for name, fast, ref, make in (
            ("relu", ft.relu, F.relu, lambda n: [torch.randn(n)]),
            ("softmax (rows of 1000)", lambda x: ft.softmax(x, -1), lambda x: F.softmax(x, -1),
             lambda n: [torch.randn(max(n // 1000, 1), 1000)]),
            ("linear (n,256)x(256,256)", ft.linear, F.linear, lambda n: [torch.randn(max(n // 256, 1), 256),
                                                                         torch.randn(256, 256)])):
        crossover[name] = None
        for k in range(4, 23, 2):
            inputs = make(2 ** k)
            if timeit(lambda: fast(*inputs), 0.05) < timeit(lambda: ref(*inputs), 0.05):
                crossover[name] = inputs[0].numel()
                break
    return rows, crossover


def fmt(t: float) -> str:
    return f"{t * 1e6:.1f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    print(f"fastnn {fastnn.__version__} ({fastnn.cpu_isa()}), torch {torch.__version__}; float32, CPU; "
          "median of 5; ratio = torch time / fastnn time (> 1: fastnn faster)\n")
    print("| op | shape | threads | fastnn fwd | torch fwd | ratio | fastnn fwd+bwd | torch fwd+bwd | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, nt, tf, tr, bf, br in op_rows(threads, args.quick):
        print(f"| {name} | {shape} | {nt} | {fmt(tf)} | {fmt(tr)} | {tr / tf:.2f}x | {fmt(bf)} | {fmt(br)} | "
              f"{br / bf:.2f}x |")
    print("\n| optimizer step | tensors | threads | time |")
    print("| --- | --- | --- | --- |")
    for label, shape, nt, t in optimizer_rows(threads, args.quick):
        print(f"| {label} | {shape} | {nt} | {fmt(t)} |")
    rows, crossover = overhead_rows(args.quick)
    print("\n| call on 8 float32 elements, 1 thread | time |")
    print("| --- | --- |")
    for label, t in rows:
        print(f"| {label} | {fmt(t)} |")
    print("\nfastnn.torch faster than torch from (elements, 1 thread): "
          + ", ".join(f"{k}: {v if v else '> 4M'}" for k, v in crossover.items()))


def bench(args) -> int:
    """`fastnn bench --op torch`: the tables for args.threads (default 1,2), smaller sizes with args.quick."""
    main((["--quick"] if args.quick else []) + (["--threads", args.threads] if args.threads else []))
    return 0


if __name__ == "__main__":
    main()
