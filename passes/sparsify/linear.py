"""Pruning linear layers' weights element by element or block by block: which weights to keep
(masks by importance), the one-shot correction of the kept ones, and the sparse formats.

Importance of a weight W[n, k]: |W[n, k]| ("magnitude"), or |W[n, k]| * ||x[:, k]|| over the
calibration activations of the layer's input ("activation", Wanda's criterion), or, for N:M
with the correction, SparseGPT's saliency w^2 / [H^-1]_kk^2 taken as the correction goes
("hessian", H = X^T X). Comparison groups:

- "bsr": blocks of (bn outputs x bk inputs), each scored by the sum of its weights' importance;
  the lowest-scoring `ratio` of the layer's blocks are removed (per layer), or of each block
  row's (`group="row"`: every block row keeps the same count);
- "N:M": in every output row, of each M consecutive inputs the N most important are kept
  (stored as p:16, p = 16 N / M; M must divide 16);
- "unstructured": the lowest-scoring `ratio` of each row's weights (`group="row"`, Wanda's
  per-output comparison, the default) or of the layer's.

Correction (`correct`): the kept weights are updated so that the layer's output on the
calibration activations moves as little as it can, with the mask fixed. Where rows share
their kept inputs (a BSR block row) that is the exact least-squares solution, one solve per
block row: min ||X_S w_S - X w||^2 + damping * ||w_S||^2 over the kept inputs S. Where every
row keeps its own inputs (N:M), one solve per row costs too much, and it is SparseGPT's
optimal-brain-surgeon update instead, column by column, with the inverse Hessian
(X^T X + damping)^-1 through its Cholesky factor and lazy updates in blocks of 128 columns
(a removed weight's error moves onto the inputs after it).
"""

from __future__ import annotations

import re

import numpy as np

from graft.codegen import sparse
from graft.runtime.errors import GraftError

DAMPING = 0.01       # of the mean diagonal of X^T X
CORRECTION_BLOCK = 128


def parse_nm(pattern: str) -> tuple[int, int] | None:
    found = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not found:
        return None
    n, m = int(found.group(1)), int(found.group(2))
    if not 0 < n < m or sparse.LANES % m:
        raise GraftError(f"sparsify pattern {pattern!r}: N:M needs 0 < N < M and M dividing "
                         f"{sparse.LANES} (2:4, 1:4, 4:8, 8:16, ...)")
    return n, m


def parse_block(block) -> tuple[int, int]:
    if isinstance(block, str):
        found = re.fullmatch(r"(\d+)x(\d+)", block)
        if not found:
            raise GraftError(f"sparsify block {block!r}: expected OUTxIN, such as 16x1 or 32x4")
        block = (int(found.group(1)), int(found.group(2)))
    bn, bk = (int(v) for v in block)
    if bn <= 0 or bk <= 0 or bn % sparse.LANES:
        raise GraftError(f"sparsify block {bn}x{bk}: the block's output count must be a "
                         f"multiple of {sparse.LANES} (one AVX-512 vector of float32), such "
                         "as 16x1, 16x4, 32x1 or 64x1")
    return bn, bk


def importance(weight: np.ndarray, x_norm: np.ndarray | None) -> np.ndarray:
    """|W| or |W| * ||x_k||, for W [N, K]."""
    scores = np.abs(weight.astype(np.float64))
    return scores * x_norm[None, :] if x_norm is not None else scores


def element_mask(scores: np.ndarray, ratio: float, per_row: bool) -> np.ndarray:
    """Element mask [N, K]: the highest-scoring (1 - ratio) of the layer's weights, or of
    each row's (`per_row`: every output keeps the same count)."""
    n, k = scores.shape
    keep = np.zeros((n, k), bool)
    if per_row:
        count = int(round(k * (1 - ratio)))
        np.put_along_axis(keep, np.argsort(-scores, axis=1, kind="stable")[:, :count], True,
                          axis=1)
    else:
        count = int(round(n * k * (1 - ratio)))
        keep.ravel()[np.argsort(-scores.ravel(), kind="stable")[:count]] = True
    return keep


def fits(pattern: str, shape: tuple[int, int], block=None) -> str | None:
    """Why a weight [N, K] cannot take the pattern, or None."""
    n, k = shape
    if pattern == "bsr":
        bn, bk = block
        if n % bn or k % bk:
            return f"its shape {n}x{k} is not whole {bn}x{bk} blocks"
        return None
    if n % sparse.LANES or k % sparse.LANES:
        return f"its shape {n}x{k} is not a multiple of {sparse.LANES} both ways"
    return None


def block_mask(scores: np.ndarray, block: tuple[int, int], ratio: float,
               per_row: bool) -> np.ndarray:
    """Kept blocks [N / bn, K / bk] (bool): the highest-scoring (1 - ratio) of them."""
    bn, bk = block
    n, k = scores.shape
    block_scores = scores.reshape(n // bn, bn, k // bk, bk).sum(axis=(1, 3))
    keep = np.zeros(block_scores.shape, bool)
    if per_row:
        count = int(round(block_scores.shape[1] * (1 - ratio)))
        if count:
            top = np.argsort(-block_scores, axis=1, kind="stable")[:, :count]
            np.put_along_axis(keep, top, True, axis=1)
    else:
        count = int(round(block_scores.size * (1 - ratio)))
        if count:
            top = np.argsort(-block_scores.ravel(), kind="stable")[:count]
            keep.ravel()[top] = True
    return keep


def expand_block_mask(keep: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    bn, bk = block
    return np.repeat(np.repeat(keep, bn, axis=0), bk, axis=1)


def nm_mask(scores: np.ndarray, n_kept: int, m: int) -> np.ndarray:
    """Element mask [N, K]: in every row, the n_kept most important of each m inputs."""
    n, k = scores.shape
    groups = scores.reshape(n, k // m, m)
    top = np.argsort(-groups, axis=2, kind="stable")[:, :, :n_kept]
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, top, True, axis=2)
    return keep.reshape(n, k)


def _damped(gram: np.ndarray) -> np.ndarray:
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    return h


def correct_block_rows(weight: np.ndarray, gram: np.ndarray, keep: np.ndarray,
                       rows: int) -> np.ndarray:
    """W [N, K] with the weights outside `keep` removed and the kept ones refitted by least
    squares, for masks whose every `rows` consecutive rows keep the same inputs."""
    h = _damped(gram)
    w = weight.astype(np.float64)
    out = np.zeros_like(w)
    for start in range(0, w.shape[0], rows):
        kept = np.nonzero(keep[start])[0]
        if len(kept) == 0:
            continue
        target = h[kept] @ w[start:start + rows].T          # X_S^T X w
        out[start:start + rows, kept] = np.linalg.solve(h[np.ix_(kept, kept)], target).T
    return out.astype(weight.dtype)


def correct(weight: np.ndarray, gram: np.ndarray, keep: np.ndarray | None,
            choose_nm: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W [N, K] with the weights outside the mask removed and the kept ones updated, the
    mask): SparseGPT's update, keeping x @ W.T close to the original on activations whose
    X^T X is `gram`. The mask is `keep`, or with `choose_nm` = (N, M) it is chosen as the
    update goes (SparseGPT's N:M selection): of each M inputs, the N whose removal costs
    most, w^2 / [H^-1]_jj^2, with w as updated so far."""
    keep = np.zeros(weight.shape, bool) if choose_nm else keep.copy()
    w = weight.astype(np.float64).copy()
    h = _damped(gram)
    w[:, np.diag(gram) == 0] = 0.0
    try:
        inverse = np.linalg.inv(h)
        upper = np.linalg.cholesky(inverse).T   # H^-1 = U^T U, U upper triangular
    except np.linalg.LinAlgError:
        if choose_nm:
            keep = nm_mask(np.abs(weight), *choose_nm)
        return np.where(keep, weight, 0).astype(weight.dtype), keep
    k = w.shape[1]
    for start in range(0, k, CORRECTION_BLOCK):
        end = min(start + CORRECTION_BLOCK, k)
        block = w[:, start:end]            # a view: updated in place
        errors = np.zeros_like(block)
        for i in range(end - start):
            col = start + i
            if choose_nm and col % choose_nm[1] == 0:
                kept, group = choose_nm
                cost = block[:, i:i + group] ** 2 / np.diag(upper)[col:col + group] ** 2
                keep[:, col:col + group] = nm_mask(cost, kept, group)
            removed = ~keep[:, col]
            err = np.where(removed, block[:, i], 0.0) / upper[col, col]
            block[:, i:] -= err[:, None] * upper[col, col:end][None, :]
            block[removed, i] = 0.0
            errors[:, i] = err
        w[:, end:] -= errors @ upper[start:end, end:]
    return np.where(keep, w, 0.0).astype(weight.dtype), keep


def pack(pattern: str, weight: np.ndarray, keep: np.ndarray, block=None) -> dict:
    """The stored arrays of W [N, K] pruned to `keep` (blocks for "bsr", elements for "p16"
    and "unstructured")."""
    if pattern == "bsr":
        return sparse.pack_bsr(weight, keep, block)
    if pattern == "unstructured":
        return sparse.pack_unstructured(weight, keep)
    return sparse.pack_p16(weight, keep)
