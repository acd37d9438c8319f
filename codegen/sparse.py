"""Sparse weight formats and the CPU kernels that skip their zeros.

A linear layer y = x @ W.T (W [N out, K in]) with most of W zero is stored in one of:

- **BSR** (block sparse rows), blocks of `bn` output x `bk` input channels:
      data    float32 [blocks, bk, bn]   each stored block, one k of it per row of `bn` values
      indices int32   [blocks]           the block's column (k // bk)
      indptr  int32   [N / bn + 1]       block row r's blocks are indptr[r] .. indptr[r + 1]
  The kernel walks only the stored blocks: for a register tile of rows of x, each stored
  block's rows are `bn`-wide vectors (one to four AVX-512 registers) multiplied by single
  elements of x, broadcast. Block rows run in parallel (with x's row tiles), so the work is
  the stored blocks' share of the dense product.
- **p:16** (N:M along the reduction axis with M dividing 16: 2:4 is 8:16, 1:4 is 4:16, ...):
  every output channel keeps exactly p of each 16 consecutive inputs.
      values float32 [N / 16, K / 16, p, 16]   kept values, 16 output channels per row
      index  uint8   [N / 16, K / 16, p/2, 16] each value's input, 0..15 within its chunk,
                                               two per byte: slot 2s in the low four bits,
                                               2s + 1 in the high four (p odd: [.., p, 16],
                                               one per byte)
  The kernel loads x's 16-element chunk once and picks every output channel's input with one
  lane permute (`vpermps`), then multiplies the 16 kept values as one vector: no gathers.

Both hold the weight's kept values exactly (float32), so their products equal the dense
product of the pruned weight up to the order of additions. Kernels are for x86 with AVX-512
(`sparse_kernels_available`); elsewhere the pass keeps the pruned weight dense.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # float32 lanes of an AVX-512 register


def sparse_kernels_available(target) -> bool:
    from tvm.target.codegen import target_has_features

    return target is not None and target.kind.name == "llvm" and bool(
        target_has_features(["avx512f"], target))


# --- formats ---------------------------------------------------------------------------------

def pack_bsr(weight: np.ndarray, keep: np.ndarray, block: tuple[int, int]) -> dict:
    """W [N, K] and the kept blocks `keep` [N / bn, K / bk] (bool) -> the BSR arrays."""
    bn, bk = block
    n, k = weight.shape
    blocks = weight.reshape(n // bn, bn, k // bk, bk)
    rows, cols = np.nonzero(keep)
    data = blocks[rows, :, cols, :].transpose(0, 2, 1)   # [blocks, bk, bn]
    if len(rows) == 0:  # a kernel needs one block to index; a zero one changes nothing
        data, cols = np.zeros((1, bk, bn), weight.dtype), np.zeros(1, np.int64)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return {"data": np.ascontiguousarray(data, dtype=np.float32),
            "indices": cols.astype(np.int32), "indptr": indptr.astype(np.int32)}


def unpack_bsr(arrays: dict, shape: tuple[int, int]) -> np.ndarray:
    """The dense W [N, K] the BSR arrays stand for."""
    n, k = shape
    data, indices, indptr = arrays["data"], arrays["indices"], arrays["indptr"]
    bk, bn = data.shape[1:]
    dense = np.zeros((n // bn, bn, k // bk, bk), np.float32)
    for row in range(n // bn):
        for j in range(indptr[row], indptr[row + 1]):
            dense[row, :, indices[j], :] = data[j].T
    return dense.reshape(n, k)


def pack_p16(weight: np.ndarray, keep: np.ndarray) -> dict:
    """W [N, K] and its mask `keep` [N, K], which keeps the same number p of every 16
    consecutive inputs in every row -> the p:16 arrays."""
    n, k = weight.shape
    chunks = keep.reshape(n, k // LANES, LANES)
    p = int(chunks[0, 0].sum())
    if not (chunks.sum(axis=2) == p).all():
        raise ValueError("a p:16 mask keeps the same count of every 16 inputs of every row")
    index = np.nonzero(chunks)[2].reshape(n, k // LANES, p)   # ascending within a chunk
    values = np.take_along_axis(weight.reshape(n, k // LANES, LANES), index, axis=2)

    def by_vector(a):  # [N, K/16, p] -> [N/16, K/16, p, 16]
        return np.ascontiguousarray(a.reshape(n // LANES, LANES, k // LANES, -1)
                                    .transpose(0, 2, 3, 1))
    if p % 2 == 0:
        index = index[:, :, 0::2] | (index[:, :, 1::2] << 4)
    return {"values": by_vector(values).astype(np.float32),
            "index": by_vector(index).astype(np.uint8)}


def unpack_p16(arrays: dict) -> np.ndarray:
    values, index = arrays["values"], arrays["index"]
    nv, chunks, p, _ = values.shape
    if index.shape[2] != p:  # two per byte
        index = np.stack([index & 15, index >> 4], axis=3).reshape(values.shape)
    dense = np.zeros((nv, LANES, chunks, LANES), np.float32)
    v = values.transpose(0, 3, 1, 2)             # [N/16, 16, K/16, p]
    i = index.transpose(0, 3, 1, 2).astype(np.int64)
    np.put_along_axis(dense, i, v, axis=3)
    return dense.reshape(nv * LANES, chunks * LANES)


# --- kernels ---------------------------------------------------------------------------------

def bsr_row_tile(bn: int) -> int:
    """Rows of x per register tile: about 24 accumulators of AVX-512's 32 registers (fewer
    left the FMA units waiting on the loop's bookkeeping, measured at 75-90% sparsity)."""
    return {16: 24, 32: 12, 48: 8, 64: 6}.get(bn, max(1, 24 // (bn // LANES)))


def bsr_matmul_func(m, k: int, n: int, block: tuple[int, int], stored: int,
                    cores: int = 2) -> tirx.PrimFunc:
    """out [m, n] = x [m, k] @ W.T for W in BSR with `stored` blocks; m may be symbolic.
    The block's output width bn must be a multiple of 16."""
    bn, bk = block
    if bn % LANES:
        raise ValueError(f"the BSR kernel vectorizes a block's {bn} outputs: a multiple of 16")
    vecs = bn // LANES
    rows = bsr_row_tile(bn)
    block_rows = n // bn
    # few row tiles (decode, small batches): block rows split among the tasks too
    if isinstance(m, int) and m // rows >= 4 * cores:
        groups = 1
    else:
        groups = max(d for d in range(1, min(block_rows, 64) + 1) if block_rows % d == 0)
    per_group = block_rows // groups
    m_var = m

    @T.macro
    def row_tile(x, data, indices, indptr, out, i0, group, tile):
        for b in range(per_group):
            nb = group * per_group + b
            acc = T.decl_buffer((tile * bn,), "float32", scope="local")
            for r in T.unroll(tile):
                for v in T.unroll(vecs):
                    acc[T.ramp(r * bn + v * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
            for j in range(indptr[nb], indptr[nb + 1]):
                for kk in T.unroll(bk):
                    for r in T.unroll(tile):
                        for v in T.unroll(vecs):
                            acc[T.ramp(r * bn + v * 16, 1, 16)] = \
                                acc[T.ramp(r * bn + v * 16, 1, 16)] + T.broadcast(
                                    x[i0 + r, indices[j] * bk + kk], 16) \
                                * data[j, kk, T.ramp(v * 16, 1, 16)]
            for r in T.unroll(tile):
                for v in T.unroll(vecs):
                    out[i0 + r, T.ramp(nb * bn + v * 16, 1, 16)] = \
                        acc[T.ramp(r * bn + v * 16, 1, 16)]

    @T.prim_func(private=True)
    def bsr_matmul(x: T.Buffer((m_var, k), "float32"),
                   data: T.Buffer((stored, bk, bn), "float32"),
                   indices: T.Buffer((stored,), "int32"),
                   indptr: T.Buffer((block_rows + 1,), "int32"),
                   out: T.Buffer((m_var, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "BSRMatmul"})
        for task in T.parallel(m_var // rows * groups):
            row_tile(x, data, indices, indptr, out, task // groups * rows, task % groups, rows)
        for task in T.parallel(m_var % rows * groups):
            row_tile(x, data, indices, indptr, out, m_var // rows * rows + task // groups,
                     task % groups, 1)

    return bsr_matmul


def p16_tile(m) -> tuple[int, int]:
    """(rows, 16-output vectors) per register tile of the p:16 kernel."""
    if isinstance(m, int) and m < 8:
        return 1, 2
    return 8, 2


def p16_matmul_func(m, k: int, n: int, p: int) -> tirx.PrimFunc:
    """out [m, n] = x [m, k] @ W.T for W in p:16; m may be symbolic."""
    rows, vecs = p16_tile(m)
    per_byte = 2 if p % 2 == 0 else 1   # indices per byte
    index_rows = p // per_byte
    bits, mask = (4, 15) if per_byte == 2 else (0, 255)
    chunks = k // LANES
    vectors = n // LANES
    if vectors % vecs:
        vecs = 1
    col_tiles = vectors // vecs
    m_var = m

    @T.macro
    def tile_at(x, values, index, out, i0, nv0, tile):
        acc = T.decl_buffer((tile * vecs * 16,), "float32", scope="local")
        xv = T.decl_buffer((tile * 16,), "float32", scope="local")
        for r in T.unroll(tile):
            for v in T.unroll(vecs):
                acc[T.ramp((r * vecs + v) * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
        for c in range(chunks):
            for r in T.unroll(tile):
                xv[T.ramp(r * 16, 1, 16)] = x[i0 + r, T.ramp(c * 16, 1, 16)]
            for s in T.unroll(p):
                for v in T.unroll(vecs):
                    for r in T.unroll(tile):
                        acc[T.ramp((r * vecs + v) * 16, 1, 16)] = \
                            acc[T.ramp((r * vecs + v) * 16, 1, 16)] + T.call_llvm_pure_intrin(
                                "float32x16", "llvm.x86.avx512.permvar.sf.512",
                                xv[T.ramp(r * 16, 1, 16)],
                                T.shift_right(T.Cast("int32x16", index[
                                    nv0 + v, c, s // per_byte, T.ramp(0, 1, 16)]),
                                    T.broadcast(s % per_byte * bits, 16))
                                & T.broadcast(mask, 16)) \
                            * values[nv0 + v, c, s, T.ramp(0, 1, 16)]
        for r in T.unroll(tile):
            for v in T.unroll(vecs):
                out[i0 + r, T.ramp((nv0 + v) * 16, 1, 16)] = \
                    acc[T.ramp((r * vecs + v) * 16, 1, 16)]

    @T.prim_func(private=True)
    def p16_matmul(x: T.Buffer((m_var, k), "float32"),
                   values: T.Buffer((vectors, chunks, p, 16), "float32"),
                   index: T.Buffer((vectors, chunks, index_rows, 16), "uint8"),
                   out: T.Buffer((m_var, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "P16Matmul"})
        for task in T.parallel(m_var // rows * col_tiles):
            tile_at(x, values, index, out, task // col_tiles * rows, task % col_tiles * vecs,
                    rows)
        for task in T.parallel(m_var % rows * col_tiles):
            tile_at(x, values, index, out, m_var // rows * rows + task // col_tiles,
                    task % col_tiles * vecs, 1)

    return p16_matmul


# --- unstructured: p:16 with a count per (16 outputs, 16 inputs) tile ---------------------------

def pack_unstructured(weight: np.ndarray, keep: np.ndarray) -> dict:
    """W [N, K] and any mask `keep` [N, K] -> slots of 16 outputs: for each 16 x 16 tile, as
    many slots as its fullest output keeps (the others padded with zero values).
        values  float32 [slots, 16]    index uint8 [slots, 16] (input within the chunk)
        offsets int32   [N / 16 * K / 16 + 1]   tile (v, c)'s slots: offsets[v * K/16 + c] ..
    """
    n, k = weight.shape
    tiles = keep.reshape(n // LANES, LANES, k // LANES, LANES).transpose(0, 2, 1, 3)
    w = weight.reshape(n // LANES, LANES, k // LANES, LANES).transpose(0, 2, 1, 3)
    counts = tiles.sum(axis=3).max(axis=2).reshape(-1)          # [N/16 * K/16]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = np.zeros((max(int(offsets[-1]), 1), LANES), np.float32)
    index = np.zeros(values.shape, np.uint8)
    order = np.argsort(~tiles, axis=3, kind="stable")           # kept inputs first, ascending
    flat_tiles, flat_w = tiles.reshape(-1, LANES, LANES), w.reshape(-1, LANES, LANES)
    flat_order = order.reshape(-1, LANES, LANES)
    for t in np.nonzero(counts)[0]:
        count, start = counts[t], offsets[t]
        chosen = flat_order[t, :, :count]                        # [16 lanes, count]
        lanes = np.arange(LANES)[:, None]
        kept = flat_tiles[t][lanes, chosen]
        values[start:start + count] = np.where(kept, flat_w[t][lanes, chosen], 0).T
        index[start:start + count] = np.where(kept, chosen, 0).T
    return {"values": values, "index": index, "offsets": offsets}


def unpack_unstructured(arrays: dict, shape: tuple[int, int]) -> np.ndarray:
    n, k = shape
    dense = np.zeros((n // LANES, k // LANES, LANES, LANES), np.float32)  # [v, c, lane, input]
    offsets = arrays["offsets"]
    for t in range(len(offsets) - 1):
        v, c = divmod(t, k // LANES)
        for s in range(offsets[t], offsets[t + 1]):
            dense[v, c, np.arange(LANES), arrays["index"][s]] += arrays["values"][s]
    return dense.transpose(0, 2, 1, 3).reshape(n, k)


def unstructured_matmul_func(m, k: int, n: int, slots: int) -> tirx.PrimFunc:
    """out [m, n] = x [m, k] @ W.T for W packed by `pack_unstructured`; m may be symbolic."""
    rows = 1 if isinstance(m, int) and m < 8 else 8
    chunks, vectors = k // LANES, n // LANES
    m_var = m

    @T.macro
    def tile_at(x, values, index, offsets, out, i0, nv, tile):
        acc = T.decl_buffer((tile * 16,), "float32", scope="local")
        xv = T.decl_buffer((tile * 16,), "float32", scope="local")
        for r in T.unroll(tile):
            acc[T.ramp(r * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
        for c in range(chunks):
            for r in T.unroll(tile):
                xv[T.ramp(r * 16, 1, 16)] = x[i0 + r, T.ramp(c * 16, 1, 16)]
            for s in range(offsets[nv * chunks + c], offsets[nv * chunks + c + 1]):
                for r in T.unroll(tile):
                    acc[T.ramp(r * 16, 1, 16)] = acc[T.ramp(r * 16, 1, 16)] + \
                        T.call_llvm_pure_intrin(
                            "float32x16", "llvm.x86.avx512.permvar.sf.512",
                            xv[T.ramp(r * 16, 1, 16)],
                            T.Cast("int32x16", index[s, T.ramp(0, 1, 16)])) \
                        * values[s, T.ramp(0, 1, 16)]
        for r in T.unroll(tile):
            out[i0 + r, T.ramp(nv * 16, 1, 16)] = acc[T.ramp(r * 16, 1, 16)]

    @T.prim_func(private=True)
    def unstructured_matmul(x: T.Buffer((m_var, k), "float32"),
                            values: T.Buffer((slots, 16), "float32"),
                            index: T.Buffer((slots, 16), "uint8"),
                            offsets: T.Buffer((vectors * chunks + 1,), "int32"),
                            out: T.Buffer((m_var, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "UnstructuredMatmul"})
        for task in T.parallel(m_var // rows * vectors):
            tile_at(x, values, index, offsets, out, task // vectors * rows, task % vectors, rows)
        for task in T.parallel(m_var % rows * vectors):
            tile_at(x, values, index, offsets, out, m_var // rows * rows + task // vectors,
                    task % vectors, 1)

    return unstructured_matmul
