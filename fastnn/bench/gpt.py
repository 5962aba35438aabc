"""The gpt_step benchmark: tokens per second of one GPT training step (forward, backward, AdamW) with
fastnn's kernels (fastnn.torch.patch() and fastnn.torch.AdamW) and with stock PyTorch, on 1 and 2 threads,
and the peak memory of each.

The model is examples/train_gpt.py's (the test suite checks both define the same network): 6 layers,
6 heads, d_model 384, context 256, batch 8, vocabulary 98, float32, dropout 0. Each (implementation,
threads) pair runs in its own process, so the peak resident memory it reports (VmHWM, reset after the
model is built) is that configuration's alone: activations, gradients, optimizer state, workspaces.

    python -m fastnn.bench.gpt [--threads 1 2] [--steps 10] [--warmup 2]
    python -m fastnn.bench.gpt --profile [--threads 1]     # where each implementation's step goes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

CONFIG = dict(n_layer=6, n_head=6, d_model=384, block_size=256, batch_size=8, vocab=98)


def build_model(torch, n_layer, n_head, d_model, block_size, vocab, dropout=0.0):
    """examples/train_gpt.py's GPT: pre-LayerNorm blocks of causal self-attention and a GELU MLP, output
    head tied to the token embedding, GPT-2 initialisation."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.ln2 = nn.LayerNorm(d_model)
            self.fc = nn.Linear(d_model, 4 * d_model)
            self.out = nn.Linear(4 * d_model, d_model)
            self.drop = nn.Dropout(dropout)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout if self.training else 0.0)
            x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
            return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.block_size = block_size
            self.tok = nn.Embedding(vocab, d_model)
            self.pos = nn.Embedding(block_size, d_model)
            self.drop = nn.Dropout(dropout)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d_model)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.tok.weight)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT()


def _vm(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM to the current RSS
            f.write("5")
        return True
    except OSError:
        return False


def _setup(impl, threads):
    """(model, optimizer, x, y, patch context) of one implementation on `threads` threads, or a str saying
    why it cannot run."""
    import contextlib

    import torch
    torch.set_num_threads(threads)
    ctx, opt_cls = contextlib.nullcontext, torch.optim.AdamW
    if impl == "fastnn":
        try:
            import fastnn
            import fastnn.torch as ft
        except ImportError as e:
            return f"fastnn.torch unavailable ({e})"
        fastnn.set_num_threads(threads)
        ctx, opt_cls = ft.patched, ft.AdamW
    c = CONFIG
    torch.manual_seed(0)
    model = build_model(torch, c["n_layer"], c["n_head"], c["d_model"], c["block_size"], c["vocab"])
    opt = opt_cls(model.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, c["vocab"], (c["batch_size"], c["block_size"]), generator=g)
    y = torch.randint(0, c["vocab"], (c["batch_size"], c["block_size"]), generator=g)
    return model, opt, x, y, ctx


def _step(model, opt, x, y):
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def measure(impl, threads, steps, warmup):
    """One configuration in this process: {"tokens_per_s", "peak_bytes", ...} or {"error": why}."""
    setup = _setup(impl, threads)
    if isinstance(setup, str):
        return {"error": setup}
    model, opt, x, y, ctx = setup
    with ctx():
        base = _vm("VmRSS")
        peak_ok = _reset_peak()
        losses = [_step(model, opt, x, y) for _ in range(warmup)]
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            losses.append(_step(model, opt, x, y))
            times.append(time.perf_counter() - t)
        peak = _vm("VmHWM") if peak_ok else None
    c = CONFIG
    tokens = c["batch_size"] * c["block_size"]
    times.sort()
    return {"tokens_per_s": tokens / times[len(times) // 2], "best_tokens_per_s": tokens / times[0],
            "peak_bytes": None if peak is None or base is None else peak - base,
            "loss_first": losses[0], "loss_last": losses[-1]}


# Which part of the model each profiled operator belongs to (first match of a substring of its lower-cased
# name; torch's optimizers record their step as "Optimizer.step#AdamW.step").
PARTS = (("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
         ("optimizer (AdamW)", ("optimizer", "adam", "_foreach_")),
         ("matmul / linear", ("fastnn.linear", "fastnn.matmul", "aten::mm", "aten::addmm", "aten::bmm",
                              "aten::linear", "aten::matmul")),
         ("cross-entropy", ("cross_entropy", "log_softmax", "nll_loss")),
         ("LayerNorm", ("layer_norm",)),
         ("GELU", ("gelu",)),
         ("embedding", ("embedding",)))


def _part(name):
    name = name.lower()
    return next((part for part, keys in PARTS if any(k in name for k in keys)), "other")


# The fastnn functions fastnn.torch's ops call: timed as named ranges by profile().
KERNELS = ("linear", "matmul", "relu", "relu_backward", "softmax", "log_softmax", "softmax_backward",
           "log_softmax_backward", "cross_entropy", "scaled_dot_product_attention",
           "scaled_dot_product_attention_backward")


def profile(impl, threads, steps=2, warmup=1):
    """Self CPU time per part of one training step (torch.profiler; fastnn's kernels timed as ranges named
    after their function): {"parts": {part: seconds per step}, "top": [(operator, seconds per step)]}."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    setup = _setup(impl, threads)
    if isinstance(setup, str):
        return {"error": setup}
    model, opt, x, y, ctx = setup
    import fastnn
    plain = {name: getattr(fastnn, name) for name in KERNELS} if impl == "fastnn" else {}

    def timed(name, fn):  # a fastnn function whose calls are ranges named after it (fastnn.torch looks them up
        def call(*args, **kwargs):  # on the module at each call)
            with record_function(f"fastnn.{name}"):
                return fn(*args, **kwargs)
        return call
    plain_step = opt.step

    def opt_step(*a, **k):
        with record_function("optimizer.step"):
            return plain_step(*a, **k)
    opt.step = opt_step
    with ctx():
        for _ in range(warmup):
            _step(model, opt, x, y)
        for name, fn in plain.items():
            setattr(fastnn, name, timed(name, fn))
        try:
            with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    _step(model, opt, x, y)
        finally:
            for name, fn in plain.items():
                setattr(fastnn, name, fn)
    parts, top = {}, {}
    for ev in prof.events():
        sec = ev.self_cpu_time_total / 1e6 / steps
        up, part = ev, None
        while up is not None and part is None:  # the optimizer's own aten ops count as the optimizer
            part = "optimizer (AdamW)" if up.name == "optimizer.step" else None
            up = up.cpu_parent
        part = part or _part(ev.name)
        parts[part] = parts.get(part, 0.0) + sec
        top[ev.name] = top.get(ev.name, 0.0) + sec
    top = list(top.items())
    top.sort(key=lambda kv: -kv[1])
    return {"parts": parts, "top": top[:12]}


def profile_report(results, threads):
    """The per-part table of both implementations side by side (seconds per step and share)."""
    names = [p for p, _ in PARTS] + ["other"]
    lines = [f"gpt_step profile, {threads} thread(s): self CPU time per training step (torch.profiler)",
             f"{'part':<20}" + "".join(f"{impl + ' ms':>12}{'share':>8}" for impl in results)]
    totals = {impl: sum(r["parts"].values()) for impl, r in results.items()}
    for name in names:
        cells = "".join(f"{r['parts'].get(name, 0) * 1e3:>12.1f}{r['parts'].get(name, 0) / totals[impl]:>8.1%}"
                        for impl, r in results.items())
        lines.append(f"{name:<20}{cells}")
    lines.append(f"{'total':<20}" + "".join(f"{totals[impl] * 1e3:>12.1f}{'':>8}" for impl in results))
    for impl, r in results.items():
        lines.append(f"{impl}: top operators (ms per step): "
                     + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["top"][:8]))
    return "\n".join(lines)


def run(threads=(1, 2), steps=10, warmup=2, impls=("torch", "fastnn")):
    """Runs every (impl, threads) pair in a child process; returns the rows."""
    rows = []
    for t in threads:
        for impl in impls:
            cmd = [sys.executable, "-m", "fastnn.bench.gpt", "--child", impl, str(t), str(steps), str(warmup)]
            env = dict(os.environ, OMP_NUM_THREADS=str(t))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                res = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
            rows.append(dict(impl=impl, threads=t, **res))
    return rows


def report(rows):
    lines = ["gpt_step: 6 layers, 6 heads, d_model 384, context 256, batch 8, vocab 98, float32; "
             "fwd + bwd + AdamW, median of the timed steps",
             f"{'impl':<8}{'threads':>8}{'tokens/s':>12}{'vs torch':>10}{'peak MiB':>10}"]
    torch_tps = {r["threads"]: r.get("tokens_per_s") for r in rows if r["impl"] == "torch"}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['impl']:<8}{r['threads']:>8}  {r['error']}")
            continue
        ratio = r["tokens_per_s"] / torch_tps[r["threads"]] if torch_tps.get(r["threads"]) else float("nan")
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        lines.append(f"{r['impl']:<8}{r['threads']:>8}{r['tokens_per_s']:>12,.0f}{ratio:>9.2f}x{peak:>10}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="gpt_step: GPT training-step throughput, fastnn vs stock PyTorch")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", nargs="+", choices=["torch", "fastnn"], default=["torch", "fastnn"])
    p.add_argument("--profile", action="store_true",
                   help="profile one step of each implementation (self CPU time per part) instead of timing it")
    p.add_argument("--child", nargs=4, metavar=("IMPL", "THREADS", "STEPS", "WARMUP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        impl, t, s, w = args.child
        print(json.dumps(measure(impl, int(t), int(s), int(w))))
        return
    if args.profile:
        results = {}
        for impl in args.impl:
            r = profile(impl, args.threads[0])
            if "error" in r:
                print(f"{impl}: {r['error']}")
            else:
                results[impl] = r
        if results:
            print(profile_report(results, args.threads[0]))
        return
    print(report(run(args.threads, args.steps, args.warmup, args.impl)))


def bench(args) -> int:
    """`fastnn bench --op gpt_step`: tokens/s for args.threads (default 1 and 2), fewer steps with args.quick."""
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [1, 2]
    main(["--threads", *map(str, threads)] + (["--steps", "3", "--warmup", "1"] if args.quick else []))
    return 0


if __name__ == "__main__":
    main()
