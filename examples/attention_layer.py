"""Multi-head self-attention forward and backward with fastnn, its gradients checked.

    python examples/attention_layer.py [--batch 2 --length 5 --dim 8 --heads 2]

The layer: q, k, v = linear(x, Wq, bq), linear(x, Wk, bk), linear(x, Wv, bv), split into heads;
o = scaled_dot_product_attention(q, k, v, return_lse=True) per head; y = linear(concat(o), Wo, bo).
The backward chains linear_backward and scaled_dot_product_attention_backward (flash-style, from the
forward's log-sum-exp). Three settings: no mask, causal, and a key-padding mask (bool attn_mask).
Gradients of every input and parameter are checked in float64 against central finite differences and,
when torch imports, against torch.nn.MultiheadAttention with autograd. Prints the errors; exits 1 if a
check fails. Importable: MultiHeadSelfAttention, check(...), main(argv).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import fastnn

FD_STEP, FD_RTOL = 1e-5, 1e-7      # central differences: O(h^2) + O(eps/h) ~ 1e-10 relative
TORCH_RTOL = 1e-10                 # same float64 math, different summation order


class MultiHeadSelfAttention:
    """params = [Wq, bq, Wk, bk, Wv, bv, Wo, bo], weights (dim, dim) as fastnn.linear takes them."""

    NAMES = ["Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"]

    def __init__(self, dim, heads, rng, dtype=np.float64):
        if dim % heads:
            raise ValueError(f"heads: {heads} does not divide dim {dim}")
        self.dim, self.heads = dim, heads
        a = np.sqrt(1.0 / dim)
        self.params = []
        for _ in range(4):
            self.params += [rng.uniform(-a, a, (dim, dim)).astype(dtype), rng.uniform(-a, a, dim).astype(dtype)]

    def _split(self, t):      # (N, L, D) -> (N, H, L, D/H), a view
        n, l, _ = t.shape
        return t.reshape(n, l, self.heads, self.dim // self.heads).transpose(0, 2, 1, 3)

    def _merge(self, t):      # (N, H, L, D/H) -> (N, L, D)
        n, h, l, e = t.shape
        return np.ascontiguousarray(t.transpose(0, 2, 1, 3)).reshape(n, l, h * e)

    def forward(self, x, attn_mask=None, is_causal=False):
        """x (N, L, dim) -> (y (N, L, dim), cache for backward)."""
        wq, bq, wk, bk, wv, bv, wo, bo = self.params
        q, k, v = (self._split(fastnn.linear(x, w, b)) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        o, lse = fastnn.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                     return_lse=True)
        ctx = self._merge(o)
        return fastnn.linear(ctx, wo, bo), (x, q, k, v, o, lse, ctx, attn_mask, is_causal)

    def backward(self, grad_y, cache):
        """-> (grad_x, [grads of params in order])."""
        x, q, k, v, o, lse, ctx, attn_mask, is_causal = cache
        wq, _, wk, _, wv, _, wo, _ = self.params
        gctx, gwo, gbo = fastnn.linear_backward(grad_y, ctx, wo)
        gq, gk, gv = fastnn.scaled_dot_product_attention_backward(
            self._split(gctx), q, k, v, o, lse, attn_mask=attn_mask, is_causal=is_causal)
        grads, gx = [], np.zeros_like(x)
        for g, w in ((gq, wq), (gk, wk), (gv, wv)):
            gxi, gw, gb = fastnn.linear_backward(self._merge(g), x, w)
            gx += gxi
            grads += [gw, gb]
        return gx, grads + [gwo, gbo]


def numerical_grad(f, a, h=FD_STEP):
    """Central differences of the scalar f() with respect to every element of the contiguous array a."""
    g = np.zeros(a.shape)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


def rel_errs(got, want):
    """Per-array ||got - want|| / max(||want||, 1e-3 ||all of want||). The floor is there because some
    gradients are exactly zero in theory: bk's (adding c to every key adds q.c to a whole row of scores,
    which softmax ignores), where finite differences leave only rounding noise."""
    total = np.sqrt(sum(np.sum(w * w) for w in want))
    return [float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-3 * total, 1e-300)) for g, w in zip(got, want)]


def torch_grads(layer, x, grad_y, key_padding, is_causal):
    """The same layer as torch.nn.MultiheadAttention (float64, autograd): (grad_x, param grads in our order)."""
    import torch
    d, h = layer.dim, layer.heads
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True, dtype=torch.float64)
    wq, bq, wk, bk, wv, bv, wo, bo = layer.params
    with torch.no_grad():   # torch stores weights (out, in) and computes x @ W^T
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([wq.T, wk.T, wv.T])))
        mha.in_proj_bias.copy_(torch.from_numpy(np.concatenate([bq, bk, bv])))
        mha.out_proj.weight.copy_(torch.from_numpy(wo.T))
        mha.out_proj.bias.copy_(torch.from_numpy(bo))
    tx = torch.tensor(x, requires_grad=True)
    kw = {}
    if is_causal:   # torch wants the mask itself (True = not allowed) alongside the is_causal hint
        L = x.shape[1]
        kw = dict(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True)
    if key_padding is not None:
        kw["key_padding_mask"] = torch.from_numpy(~key_padding)   # torch: True = ignore this key
    y, _ = mha(tx, tx, tx, need_weights=False, **kw)
    (y * torch.from_numpy(grad_y)).sum().backward()
    gw, gb = mha.in_proj_weight.grad.numpy(), mha.in_proj_bias.grad.numpy()
    grads = []
    for i in range(3):
        grads += [gw[i * d:(i + 1) * d].T, gb[i * d:(i + 1) * d]]
    grads += [mha.out_proj.weight.grad.numpy().T, mha.out_proj.bias.grad.numpy()]
    return tx.grad.numpy(), grads, y.detach().numpy()


def check(batch=2, length=5, dim=8, heads=2, seed=0, use_torch=True, out=print):
    """Runs the three settings; returns True when every check passes."""
    rng = np.random.default_rng(seed)
    layer = MultiHeadSelfAttention(dim, heads, rng)
    x = rng.standard_normal((batch, length, dim))
    grad_y = rng.standard_normal((batch, length, dim))
    key_padding = np.ones((batch, length), dtype=bool)     # True = a real token
    key_padding[0, length - max(1, length // 3):] = False  # pad the end of the first sequence
    torch_ok = False
    if use_torch:
        try:
            import torch  # noqa: F401
            torch_ok = True
        except ImportError:
            out("torch is not importable: skipping the torch.nn.MultiheadAttention comparison")
    ok = True
    for name, mask, causal in (("no mask", None, False), ("causal", None, True),
                               ("key padding", key_padding[:, None, None, :], False)):
        y, cache = layer.forward(x, mask, causal)
        gx, grads = layer.backward(grad_y, cache)

        def f():
            return float(np.sum(grad_y * layer.forward(x, mask, causal)[0]))

        fd = rel_errs([gx] + grads, [numerical_grad(f, a) for a in [x] + layer.params])
        worst = int(np.argmax(fd))
        passed = max(fd) <= FD_RTOL
        ok &= passed
        out(f"{name:12s} finite differences: max relative error {max(fd):.2e} "
            f"({(['x'] + layer.NAMES)[worst]}) [{'ok' if passed else 'FAIL'}: <= {FD_RTOL:.0e}]")
        if torch_ok:
            tgx, tgrads, ty = torch_grads(layer, x, grad_y, key_padding if mask is not None else None, causal)
            errs = rel_errs([y], [ty]) + rel_errs([gx] + grads, [tgx] + tgrads)
            passed = max(errs) <= TORCH_RTOL
            ok &= passed
            out(f"{name:12s} torch.nn.MultiheadAttention: output {errs[0]:.2e}, gradients max relative error "
                f"{max(errs[1:]):.2e}, max abs {max(np.max(np.abs(a - b)) for a, b in zip([gx] + grads, [tgx] + tgrads)):.2e} "
                f"[{'ok' if passed else 'FAIL'}: <= {TORCH_RTOL:.0e}]")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="sequences per batch")
    ap.add_argument("--length", type=int, default=5, help="sequence length")
    ap.add_argument("--dim", type=int, default=8, help="model width (split across the heads)")
    ap.add_argument("--heads", type=int, default=2, help="attention heads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    args = ap.parse_args(argv)
    if not hasattr(fastnn, "scaled_dot_product_attention_backward"):
        print("error: this fastnn has no scaled_dot_product_attention_backward", file=sys.stderr)
        return 2
    print(f"multi-head self-attention: batch {args.batch}, length {args.length}, dim {args.dim}, "
          f"{args.heads} heads, float64")
    ok = check(args.batch, args.length, args.dim, args.heads, args.seed, not args.no_torch)
    print("all gradient checks passed" if ok else "some gradient checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
