"""A character-level GPT trained end to end on the Python standard library's own source files.

The model is plain PyTorch: a decoder-only GPT (token + position embeddings, pre-LayerNorm blocks of causal
multi-head self-attention and a GELU MLP, output head tied to the token embedding). The text is every .py
file under sysconfig.get_paths()["stdlib"] (site-packages excluded), sorted by path and concatenated: the
first 90% trains, the last 10% validates; nothing is downloaded. Characters outside printable ASCII, newline
and tab map to one "other" symbol (98 symbols).

    python examples/train_gpt.py --impl torch --steps 2000          # stock PyTorch, torch.optim.AdamW
    python examples/train_gpt.py --impl fastnn --steps 2000         # under fastnn.torch.patch(), fastnn.torch.AdamW
    python examples/train_gpt.py --compare --steps 50 --dropout 0   # both from the same seed and weights
    python examples/train_gpt.py --steps 500 --save gpt.pt --plot gpt.png --sample 400
    python examples/train_gpt.py --resume gpt.pt --steps 1000       # continue to step 1000

--impl fastnn runs the same model code with torch's attention, linear layers and cross-entropy replaced by
fastnn's kernels (fastnn.torch.patch()) and fastnn.torch.AdamW as the optimizer; it needs fastnn.torch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- data -----------------------------------------------------------------------------------------------

ALPHABET = "\n\t" + "".join(chr(c) for c in range(32, 127))   # 97 symbols; index len(ALPHABET) = other
VOCAB = len(ALPHABET) + 1
_LOOKUP = np.full(0x110000, len(ALPHABET), dtype=np.uint8)
_LOOKUP[[ord(c) for c in ALPHABET]] = np.arange(len(ALPHABET), dtype=np.uint8)


def stdlib_files():
    """The standard library's .py files, sorted by path (site-packages / dist-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    return sorted(files)


def load_corpus(max_chars=None):
    """(train, val) uint8 token arrays: the stdlib sources concatenated, split 90% / 10%."""
    parts, total = [], 0
    for path in stdlib_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        total += len(parts[-1])
        if max_chars and total >= max_chars:
            break
    text = "".join(parts)[:max_chars] if max_chars else "".join(parts)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    tokens = _LOOKUP[codes]
    n = int(0.9 * len(tokens))
    return tokens[:n], tokens[n:]


def decode(tokens):
    return "".join(ALPHABET[t] if t < len(ALPHABET) else "?" for t in tokens)


def unigram_entropy(tokens):
    """Entropy (nats per character) of the symbol frequencies: the loss of the best model that ignores context."""
    p = np.bincount(tokens, minlength=VOCAB) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def get_batch(data, batch_size, block_size, rng):
    ix = rng.integers(0, len(data) - block_size - 1, batch_size)
    x = np.stack([data[i:i + block_size] for i in ix]).astype(np.int64)
    y = np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


# ---- model ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d_model, n_head, dropout):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
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
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab, block_size, n_layer, n_head, d_model, dropout):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():   # GPT-2's initialisation
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.tok.weight)          # output head tied to the token embedding
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, n, generator=None, temperature=1.0):
        for _ in range(n):
            logits, _ = self(idx[:, -self.block_size:])
            probs = F.softmax(logits[:, -1] / temperature, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx


def param_groups(model, weight_decay):
    """Weight decay on the matrices (and the tied embedding), none on biases, LayerNorm and positions."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("pos")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith("pos"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ---- the two implementations ----------------------------------------------------------------------------

def fastnn_torch():
    """fastnn.torch, or SystemExit naming why it is unavailable."""
    try:
        import fastnn.torch as ft
    except ImportError as e:
        raise SystemExit(f"--impl fastnn needs fastnn.torch, which this fastnn does not provide ({e})") from None
    return ft


def make_impl(impl, model, args):
    """(optimizer, context manager the steps run in) for --impl torch or fastnn."""
    groups = param_groups(model, args.weight_decay)
    kw = dict(lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    if impl == "torch":
        return torch.optim.AdamW(groups, **kw), contextlib.nullcontext
    ft = fastnn_torch()
    return ft.AdamW(groups, **kw), ft.patched


def lr_at(step, args):
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model, data, args, batches):
    model.eval()
    rng = np.random.default_rng(12345)        # the same validation batches every time
    losses = [model(*get_batch(data, args.batch_size, args.block_size, rng))[1].item() for _ in range(batches)]
    model.train()
    return float(np.mean(losses))


def train(impl, args, train_data, val_data, init_state, checkpoint=None, log=print):
    """Trains a model from init_state (or a checkpoint) to args.steps; returns (model, history)."""
    torch.manual_seed(args.seed)
    model = GPT(VOCAB, args.block_size, args.n_layer, args.n_head, args.d_model, args.dropout)
    model.load_state_dict(init_state)
    opt, ctx = make_impl(impl, model, args)
    rng = np.random.default_rng(args.seed)
    hist = {"step": [], "loss": [], "val_step": [], "val_loss": [], "impl": impl}
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        rng.bit_generator.state = checkpoint["data_rng"]
        torch.set_rng_state(checkpoint["torch_rng"])
        hist, start = checkpoint["history"], checkpoint["step"]
    tokens_per_step = args.batch_size * args.block_size
    t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start
    with ctx():
        model.train()
        for step in range(start, args.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            x, y = get_batch(train_data, args.batch_size, args.block_size, rng)
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist["step"].append(step + 1)
            hist["loss"].append(loss.item())
            last = step + 1 == args.steps
            if args.eval_interval and ((step + 1) % args.eval_interval == 0 or last):
                hist["val_step"].append(step + 1)
                hist["val_loss"].append(evaluate(model, val_data, args, args.eval_batches))
            if (step + 1) % args.log_interval == 0 or last:
                now = time.perf_counter()
                tps = (step + 1 - last_step) * tokens_per_step / max(now - last_t, 1e-9)
                eta = (args.steps - step - 1) * tokens_per_step / max(tps, 1e-9)
                val = f"  val {hist['val_loss'][-1]:.4f}" if hist["val_step"] and hist["val_step"][-1] == step + 1 else ""
                log(f"[{impl}] step {step + 1:>6}/{args.steps}  loss {loss.item():.4f}{val}  "
                    f"{tps:,.0f} tok/s  elapsed {now - t0:,.0f} s  ETA {eta:,.0f} s")
                last_t, last_step = now, step + 1
    hist["wall_s"] = hist.get("wall_s", 0.0) + time.perf_counter() - t0
    return model, opt, rng, hist


def save_checkpoint(path, model, opt, rng, hist, args):
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "data_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "history": hist, "step": hist["step"][-1] if hist["step"] else 0,
                "config": {k: getattr(args, k) for k in CONFIG_KEYS}}, path)


CONFIG_KEYS = ("n_layer", "n_head", "d_model", "block_size", "batch_size", "dropout", "lr", "min_lr", "warmup",
               "weight_decay", "seed", "max_chars")


def plot(path, histories, unigram=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for h in histories:
        ax.plot(h["step"], h["loss"], lw=0.8, alpha=0.6, label=f"{h['impl']} train")
        if h["val_step"]:
            ax.plot(h["val_step"], h["val_loss"], "o-", ms=3, label=f"{h['impl']} validation")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram entropy ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title("character-level GPT on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=["torch", "fastnn"], default="torch")
    p.add_argument("--compare", action="store_true", help="run both implementations from the same weights")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch and fastnn threads (default: theirs)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the corpus")
    p.add_argument("--eval-interval", type=int, default=250, help="steps between validation losses (0: none)")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--save", metavar="FILE", help="checkpoint (model and optimizer) at the end")
    p.add_argument("--resume", metavar="FILE", help="continue from a checkpoint to --steps")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="print N generated characters at the end")
    args = p.parse_args(argv)
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not a multiple of --n-head {args.n_head}")
    if args.compare and args.resume:
        p.error("--compare starts both runs from scratch; it does not take --resume")
    return args


def main(argv=None):
    args = parse_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=False)
        for k, v in checkpoint["config"].items():   # the model and data as they were
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.impl == "fastnn" or args.compare:
            import fastnn
            fastnn.set_num_threads(args.threads)
    train_data, val_data = load_corpus(args.max_chars)
    print(f"corpus: {len(train_data) + len(val_data):,} characters of the standard library's .py files "
          f"({len(train_data):,} train / {len(val_data):,} validation), {VOCAB} symbols, "
          f"unigram entropy {unigram_entropy(train_data):.3f} nats/char")
    torch.manual_seed(args.seed)
    init = GPT(VOCAB, args.block_size, args.n_layer, args.n_head, args.d_model, args.dropout)
    print(f"model: {sum(p.numel() for p in init.parameters()):,} parameters; {args.n_layer} layers, "
          f"{args.n_head} heads, d_model {args.d_model}, context {args.block_size}, batch {args.batch_size}")
    init_state = copy.deepcopy(init.state_dict())
    impls = ["torch", "fastnn"] if args.compare else [args.impl]
    runs = [train(impl, args, train_data, val_data, init_state, checkpoint) for impl in impls]
    if args.compare:
        a, b = runs[0][3], runs[1][3]
        print(f"\n{'step':>6} {'torch':>10} {'fastnn':>10} {'diff':>10}")
        for s, la, lb in zip(a["step"], a["loss"], b["loss"]):
            print(f"{s:>6} {la:>10.5f} {lb:>10.5f} {lb - la:>+10.2e}")
        for h in (a, b):
            n = len(h["step"])
            print(f"{h['impl']}: {h['wall_s']:.1f} s, {n * args.batch_size * args.block_size / h['wall_s']:,.0f} tok/s")
    for model, opt, rng, hist in runs:
        if hist["val_loss"]:
            print(f"[{hist['impl']}] validation loss {hist['val_loss'][-1]:.4f} nats/char at step {hist['val_step'][-1]}, "
                  f"{hist['wall_s']:.0f} s of training")
    if args.plot:
        plot(args.plot, [r[3] for r in runs], unigram_entropy(val_data))
        print(f"plot: {args.plot}")
    if args.save:
        save_checkpoint(args.save, *runs[-1], args)
        print(f"checkpoint: {args.save} (step {runs[-1][3]['step'][-1] if runs[-1][3]['step'] else 0})")
    if args.sample:
        model = runs[-1][0]
        model.eval()
        prompt = torch.tensor([[ALPHABET.index(c) for c in "def "]])
        out = model.generate(prompt, args.sample, generator=torch.Generator().manual_seed(args.seed))
        print("sample:\n" + decode(out[0].tolist()))
    return runs


if __name__ == "__main__":
    main()
