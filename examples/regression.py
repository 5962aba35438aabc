"""Linear and logistic regression trained with fastnn.linear, linear_backward and fastnn.Adam on data sets
bundled with scikit-learn (no download).

    python examples/regression.py

1. Linear regression (mean squared error) on diabetes (442 x 10), full batch, float64, Adam with a cosine
   learning-rate schedule: the weights must match the closed-form least-squares solution (np.linalg.lstsq)
   to 1e-3 relative (norm of the difference over the norm of the solution).
2. Logistic regression (two-class softmax + fastnn.cross_entropy) on breast cancer (569 x 30), fixed
   stratified 75/25 split: test accuracy must be >= 95%.

Features (and the diabetes target) are standardized with the training set's statistics. Prints the figures;
exits 1 if a check fails, 2 if scikit-learn is missing. Importable: fit_linear, fit_logistic, main(argv).
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

import fastnn


def standardize(xtr, xte=None):
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0)
    sd[sd == 0] = 1.0
    return ((xtr - mu) / sd, None if xte is None else (xte - mu) / sd)


def fit_linear(x, y, steps=2000, lr=0.1):
    """Least squares by Adam on the MSE, full batch. x (N, D), y (N,). Returns (weight (D,), bias).
    The learning rate follows a cosine from lr to 0: a constant one leaves Adam hovering near the
    minimum (its normalized step does not shrink with the gradient)."""
    n, d = x.shape
    w, b = np.zeros((d, 1), x.dtype), np.zeros(1, x.dtype)
    opt = fastnn.Adam([w, b], lr=lr)
    target = y.reshape(n, 1)
    for s in range(steps):
        opt.lr = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        pred = fastnn.linear(x, w, b)
        grad = (2.0 / n) * (pred - target)            # d mean((pred - y)^2) / d pred
        _, gw, gb = fastnn.linear_backward(grad, x, w)
        opt.step([gw, gb])
    return w[:, 0].copy(), float(b[0])


def fit_logistic(x, labels, epochs=20, lr=1e-2, batch_size=32, seed=0):
    """Two-class softmax regression (weight (D, 2), bias (2,)) with mini-batch Adam. Returns (w, b)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    w, b = np.zeros((d, 2), x.dtype), np.zeros(2, x.dtype)
    opt = fastnn.Adam([w, b], lr=lr)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            _, grad = fastnn.cross_entropy(fastnn.linear(x[idx], w, b), labels[idx])
            _, gw, gb = fastnn.linear_backward(grad, x[idx], w)
            opt.step([gw, gb])
    return w, b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps for the linear fit")
    ap.add_argument("--epochs", type=int, default=20, help="epochs for the logistic fit")
    args = ap.parse_args(argv)
    try:
        from sklearn.datasets import load_breast_cancer, load_diabetes
        from sklearn.model_selection import train_test_split
    except ImportError:
        print("error: this example uses data sets bundled with scikit-learn, which is not installed "
              "(pip install scikit-learn)", file=sys.stderr)
        return 2
    ok = True

    # 1. Linear regression against the closed form.
    x, y = load_diabetes(return_X_y=True)
    x, _ = standardize(x)
    y = (y - y.mean()) / y.std()
    w, b = fit_linear(x, y, steps=args.steps)
    sol = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    est = np.r_[w, b]
    rel = np.linalg.norm(est - sol) / np.linalg.norm(sol)
    mse_fit = float(np.mean((x @ w + b - y) ** 2))
    mse_ls = float(np.mean((x @ sol[:-1] + sol[-1] - y) ** 2))
    passed = rel <= 1e-3
    ok &= passed
    print(f"linear regression (diabetes, {x.shape[0]} x {x.shape[1]}, {args.steps} Adam steps): "
          f"MSE {mse_fit:.6f} (least squares {mse_ls:.6f}); weights vs lstsq relative error {rel:.2e} "
          f"(max abs {np.max(np.abs(est - sol)):.2e}) [{'ok' if passed else 'FAIL'}: <= 1e-3]")

    # 2. Logistic regression, held-out accuracy.
    x, labels = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, labels.astype(np.int64), test_size=0.25, random_state=0,
                                          stratify=labels)
    xtr, xte = standardize(xtr, xte)
    w, b = fit_logistic(xtr, ytr, epochs=args.epochs)
    acc_tr = float(np.mean(np.argmax(fastnn.linear(xtr, w, b), axis=1) == ytr))
    acc = float(np.mean(np.argmax(fastnn.linear(xte, w, b), axis=1) == yte))
    loss, _ = fastnn.cross_entropy(fastnn.linear(xte, w, b), yte)
    passed = acc >= 0.95
    ok &= passed
    print(f"logistic regression (breast cancer, {xtr.shape[0]} train / {xte.shape[0]} test, {args.epochs} "
          f"epochs): train accuracy {acc_tr:.4f}, test accuracy {acc:.4f}, test loss {loss:.4f} "
          f"[{'ok' if passed else 'FAIL'}: >= 0.95]")
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
