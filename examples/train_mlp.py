"""Train the classic MLP (Dense 128 ReLU -> Dense 10 softmax, Adam lr 1e-3, batch 64, sparse categorical
cross-entropy) with fastnn, forward and backward, on scikit-learn's bundled 8x8 digits or on MNIST.

    python examples/train_mlp.py                      # digits, 30 epochs (needs scikit-learn)
    python examples/train_mlp.py --mnist DIR          # the four MNIST IDX files in DIR (.gz or not)
    python examples/train_mlp.py --compare-numpy      # the same loop in plain NumPy, time per epoch of both
    python examples/train_mlp.py --plot curves.png    # loss/accuracy curves (needs matplotlib)

Importable: MLP (fastnn) and NumpyMLP / NumpyAdam (plain NumPy, same arithmetic), load_digits_split,
load_mnist, train and main(argv) are what the tests use. The last line printed is
`final test accuracy A (correct/total) after E epochs`.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np

import fastnn

DTYPE = np.float32


# ---- models ---------------------------------------------------------------------------------------

def glorot_uniform(rng, n_in, n_out, dtype=DTYPE):
    """Keras' default Dense initializer: U(-a, a) with a = sqrt(6 / (in + out))."""
    a = np.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-a, a, (n_in, n_out)).astype(dtype)


def init_params(rng, n_in, n_hidden, n_out, dtype=DTYPE):
    """[w1 (in, hidden), b1, w2 (hidden, out), b2]: Glorot-uniform weights, zero biases."""
    return [glorot_uniform(rng, n_in, n_hidden, dtype), np.zeros(n_hidden, dtype),
            glorot_uniform(rng, n_hidden, n_out, dtype), np.zeros(n_out, dtype)]


class MLP:
    """Dense(hidden, relu) -> Dense(out) with the softmax fused into the cross-entropy, all on fastnn."""

    def __init__(self, params):
        self.params = params          # [w1, b1, w2, b2], updated in place by the optimizer

    def logits(self, x):
        w1, b1, w2, b2 = self.params
        return fastnn.linear(fastnn.linear(x, w1, b1, activation="relu"), w2, b2)

    def loss_and_grads(self, x, labels):
        """(mean cross-entropy, [dw1, db1, dw2, db2]) for one batch."""
        w1, b1, w2, b2 = self.params
        h = fastnn.linear(x, w1, b1, activation="relu")          # bias + ReLU fused in the product
        z = fastnn.linear(h, w2, b2)
        loss, dz = fastnn.cross_entropy(z, labels)               # (softmax - onehot) / N
        dh, dw2, db2 = fastnn.linear_backward(dz, h, w2)
        dh = fastnn.relu_backward(dh, h, out=dh)                 # h > 0 exactly where the pre-activation is
        _, dw1, db1 = fastnn.linear_backward(dh, x, w1, x_grad=False)   # the data needs no gradient
        return loss, [dw1, db1, dw2, db2]


class NumpyMLP(MLP):
    """The same network and arithmetic in plain NumPy (the baseline of --compare-numpy)."""

    def logits(self, x):
        w1, b1, w2, b2 = self.params
        return np.maximum(x @ w1 + b1, 0) @ w2 + b2

    def loss_and_grads(self, x, labels):
        w1, b1, w2, b2 = self.params
        n = x.shape[0]
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, labels]))
        dz = e / s
        dz[rows, labels] -= 1
        dz /= n
        dh = dz @ w2.T
        dh[h <= 0] = 0
        return loss, [x.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]


class NumpyAdam:
    """torch.optim.Adam's arithmetic (no weight decay) in plain NumPy."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1 ** self.t)
        bc2_sqrt = (1 - b2 ** self.t) ** 0.5
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m += (1 - b1) * (g - m)
            v *= b2
            v += (1 - b2) * g * g
            p -= step_size * m / (np.sqrt(v) / bc2_sqrt + self.eps)


# ---- data -----------------------------------------------------------------------------------------

def standardize(xtr, xte):
    """Zero mean, unit variance per feature with the training set's statistics (constant features kept
    at 0): Adam then needs far fewer steps than on raw pixel values."""
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0)
    sd[sd == 0] = 1.0
    return ((xtr - mu) / sd).astype(DTYPE), ((xte - mu) / sd).astype(DTYPE)


def load_digits_split():
    """scikit-learn's 8x8 digits, standardized, with a fixed stratified split at train_test_split's
    default test size of 25% (1347 train, 450 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y.astype(np.int64), test_size=0.25, random_state=0, stratify=y)
    xtr, xte = standardize(xtr, xte)
    return xtr, ytr, xte, yte


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory, prefix):
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and "ubyte" in n)
    if not names:
        raise FileNotFoundError(f"{directory}: no file named {prefix}*ubyte[.gz] (the MNIST IDX files: "
                                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                                "t10k-labels-idx1-ubyte)")
    return os.path.join(directory, names[0])


def load_mnist(directory):
    """MNIST's 60,000 / 10,000 split from the four IDX files (optionally gzipped), standardized."""
    def images(prefix):
        a = _read_idx(_find(directory, prefix))
        return a.reshape(a.shape[0], -1).astype(np.float64)

    def labels(prefix):
        return _read_idx(_find(directory, prefix)).astype(np.int64)

    xtr, xte = standardize(images("train-images"), images("t10k-images"))
    return xtr, labels("train-labels"), xte, labels("t10k-labels")


# ---- training loop --------------------------------------------------------------------------------

def accuracy(model, x, y, batch=4096):
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int(np.sum(np.argmax(model.logits(x[i:i + batch]), axis=1) == y[i:i + batch]))
    return correct, x.shape[0]


def progress(epoch, epochs, done, total, stream=sys.stderr, width=30):
    filled = width * done // total
    stream.write(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        stream.write("\r" + " " * (width + 40) + "\r")
    stream.flush()


def train(runs, data, epochs, batch_size=64, seed=0, log=None, show_progress=False):
    """Mini-batch training of one or more (model, optimizer) pairs side by side: each epoch draws one batch
    order and every run takes its epoch in turn, so timed runs share the machine's conditions (a noisy
    neighbour slows both, not just one). Returns one history per run (per-epoch loss, test accuracy and
    training seconds); `log(epoch, loss, acc, seconds)` is called for the first run."""
    xtr, ytr, xte, yte = data
    rng = np.random.default_rng(seed)
    n = xtr.shape[0]
    nbatch = (n + batch_size - 1) // batch_size
    hists = [{"loss": [], "test_acc": [], "seconds": []} for _ in runs]
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        xs, ys = xtr[order], ytr[order]      # one gather per epoch; batches are then contiguous slices
        for r, ((model, opt), hist) in enumerate(zip(runs, hists)):
            total = 0.0
            t0 = time.perf_counter()
            for b in range(nbatch):
                sl = slice(b * batch_size, (b + 1) * batch_size)
                loss, grads = model.loss_and_grads(xs[sl], ys[sl])
                opt.step(grads)
                total += loss * (min(n, (b + 1) * batch_size) - b * batch_size)
                if show_progress and (b + 1 == nbatch or 30 * (b + 1) // nbatch != 30 * b // nbatch):
                    progress(epoch, epochs, b + 1, nbatch)   # at most 30 writes an epoch
            seconds = time.perf_counter() - t0
            correct, count = accuracy(model, xte, yte)
            hist["loss"].append(total / n)
            hist["test_acc"].append(correct / count)
            hist["seconds"].append(seconds)
            if log and r == 0:
                log(epoch, total / n, correct / count, seconds)
    return hists


def plot(path, hist, other=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(hist["loss"]) + 1)
    ax1.plot(epochs, hist["loss"], label="fastnn")
    ax2.plot(epochs, hist["test_acc"], label="fastnn")
    if other:
        ax1.plot(epochs, other["loss"], "--", label="NumPy")
        ax2.plot(epochs, other["test_acc"], "--", label="NumPy")
    ax1.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax2.set(xlabel="epoch", ylabel="test accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each option's default, and the description's lines kept as written."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per Adam step")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--hidden", type=int, default=128, help="width of the hidden ReLU layer")
    ap.add_argument("--seed", type=int, default=0, help="initialization and shuffling (the split is fixed)")
    ap.add_argument("--mnist", metavar="DIR", help="train on MNIST from the four IDX files in DIR")
    ap.add_argument("--plot", metavar="FILE.png", help="save loss/accuracy curves (needs matplotlib: the `plot` extra)")
    ap.add_argument("--compare-numpy", action="store_true",
                    help="also run the same loop in plain NumPy and compare the time per epoch")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1:
        ap.error("--epochs, --batch-size and --hidden must be >= 1")

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed (pip install matplotlib)",
                  file=sys.stderr)
            return 2
    if args.mnist:
        try:
            data, name = load_mnist(args.mnist), "MNIST"
        except (OSError, ValueError) as e:
            print(f"error: --mnist {args.mnist}: {e}", file=sys.stderr)
            return 1
    else:
        try:
            data, name = load_digits_split(), "digits"
        except ImportError:
            print("error: the digits data set comes with scikit-learn, which is not installed "
                  "(pip install scikit-learn), or pass --mnist DIR", file=sys.stderr)
            return 2
    xtr, ytr, xte, yte = data
    n_in, n_out = xtr.shape[1], int(max(ytr.max(), yte.max())) + 1
    print(f"{name}: {xtr.shape[0]} train / {xte.shape[0]} test, {n_in} features, {n_out} classes; "
          f"MLP {n_in}-{args.hidden}-{n_out}, Adam lr {args.lr}, batch {args.batch_size}; fastnn "
          f"{fastnn.__version__} ({fastnn.cpu_isa()}, {fastnn.get_num_threads()} threads)")

    def log(epoch, loss, acc, seconds):
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  test accuracy {acc:.4f}  "
              f"({seconds * 1e3:.1f} ms)", flush=True)

    params = init_params(np.random.default_rng(args.seed), n_in, args.hidden, n_out)
    start = [p.copy() for p in params]
    model = MLP(params)
    runs = [(model, fastnn.Adam(params, lr=args.lr))]
    if args.compare_numpy:                  # the NumPy twin: same initial weights, same batches
        runs.append((NumpyMLP(start), NumpyAdam(start, lr=args.lr)))
    hists = train(runs, data, args.epochs, args.batch_size, args.seed, log, show_progress=sys.stderr.isatty())
    hist, other = hists[0], (hists[1] if args.compare_numpy else None)
    if args.compare_numpy:
        # Median over epochs: robust to a first-epoch warm-up or a noisy neighbour.
        t_f, t_n = np.median(hist["seconds"]), np.median(other["seconds"])
        print(f"time per epoch (median of {args.epochs}): fastnn {t_f * 1e3:.2f} ms, NumPy {t_n * 1e3:.2f} ms "
              f"-> fastnn {t_n / t_f:.2f}x NumPy's speed; NumPy final test accuracy {other['test_acc'][-1]:.4f}")
    if args.plot:
        plot(args.plot, hist, other)
        print(f"curves saved to {args.plot}")
    correct, count = accuracy(model, xte, yte)
    print(f"final test accuracy {correct / count:.4f} ({correct}/{count}) after {args.epochs} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
