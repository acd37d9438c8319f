"""Exit heads fitted in closed form, and the confidence tests that decide an exit.

An exit reads a layer's hidden state h, summarises it into features f (a 4-D [N, C, H, W] map
average-pooled to a grid of at most 4 x 4 cells and flattened; a 3-D [N, T, D] sequence averaged
over T; a 2-D [N, D] state as it is), and maps them to the model's output with a linear head
z = f @ W + b fitted by ridge regression on calibration data, with the full model's own outputs
as targets (no labels, no backbone training).

Each function here exists twice, in numpy (to fit and to choose thresholds) and as Relax ops
(what the compiled exit computes); the two compute the same thing.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

GRID = 4             # cells per side a feature map is pooled to, at most
RIDGE = 1e-3         # ridge strength, relative to the mean feature energy
CONFIDENCES = ("max_prob", "entropy")


def grid_of(shape: tuple) -> int:
    """Cells per side for a [N, C, H, W] map: the largest of 4, 2, 1 dividing H and W."""
    height, width = shape[2], shape[3]
    return next(g for g in (GRID, 2, 1) if height > 0 and width > 0 and
                height % g == 0 and width % g == 0)


def feature_size(shape: tuple) -> int:
    if len(shape) == 4:
        return shape[1] * grid_of(shape) ** 2
    return shape[-1]


def features(h: np.ndarray) -> np.ndarray:
    """[rows, F] float64 features of a hidden state (see the module docstring)."""
    if h.ndim == 4:
        n, c, height, width = h.shape
        g = grid_of(h.shape)
        cells = h.reshape(n, c, g, height // g, g, width // g).astype(np.float64)
        return cells.mean(axis=(3, 5)).reshape(n, c * g * g)
    if h.ndim == 3:
        return h.astype(np.float64).mean(axis=1)
    return h.astype(np.float64)


def relax_features(h: relax.Expr, shape: tuple) -> relax.Expr:
    if len(shape) == 4:
        g = grid_of(shape)
        if g == 1:
            return relax.op.mean(h, axis=[2, 3])
        cell = (shape[2] // g, shape[3] // g)
        pooled = relax.op.nn.avg_pool2d(h, pool_size=cell, strides=cell)
        return relax.op.reshape(pooled, [shape[0], shape[1] * g * g])
    if len(shape) == 3:
        return relax.op.mean(h, axis=[1])
    return h


def fit_head(feats: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of targets [rows, C] on features [rows, F]: (W [F, C], b [C]) float32.
    Features are centred first, so the bias is not shrunk."""
    mean_f, mean_t = feats.mean(axis=0), targets.astype(np.float64).mean(axis=0)
    weight = ridge(feats - mean_f, targets - mean_t, RIDGE)
    bias = mean_t - mean_f @ weight
    return weight.astype(np.float32), bias.astype(np.float32)


def ridge(x: np.ndarray, y: np.ndarray, relative: float) -> np.ndarray:
    """argmin_W |x W - y|^2 + s |W|^2, with s = `relative` x the mean energy of x's columns."""
    gram = x.T @ x
    strength = relative * max(float(np.trace(gram)) / len(gram), 1e-12)
    return np.linalg.solve(gram + strength * np.eye(len(gram)), x.T @ y)


def out_of_fold(feats: np.ndarray, targets: np.ndarray, folds: int = 5) -> np.ndarray:
    """Each row's head output from a head fitted on the other folds' rows."""
    predicted = np.empty((len(feats), targets.shape[1]))
    fold_of = np.arange(len(feats)) % folds
    for fold in range(folds):
        rows = fold_of == fold
        if rows.all() or not rows.any():
            continue
        weight, bias = fit_head(feats[~rows], targets[~rows])
        predicted[rows] = feats[rows] @ weight.astype(np.float64) + bias
    return predicted


def confidence(logits: np.ndarray, kind: str) -> np.ndarray:
    """Per row, in [0, 1]: the largest softmax probability (`max_prob`), or one minus the
    softmax entropy over its maximum, log C (`entropy`)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if kind == "max_prob":
        return p.max(axis=-1)
    return 1.0 + (p * np.log(p + 1e-12)).sum(axis=-1) / np.log(p.shape[-1])


def relax_confidence(logits: relax.Expr, classes: int, kind: str) -> relax.Expr:
    p = relax.op.nn.softmax(logits, axis=-1)
    if kind == "max_prob":
        return relax.op.max(p, axis=[-1])
    plogp = relax.op.multiply(p, relax.op.log(relax.op.add(p, relax.const(1e-12, "float32"))))
    scale = relax.const(1.0 / float(np.log(classes)), "float32")
    return relax.op.add(relax.const(1.0, "float32"),
                        relax.op.multiply(relax.op.sum(plogp, axis=[-1]), scale))
