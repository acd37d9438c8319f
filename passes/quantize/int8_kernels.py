"""Kernels for int8 weights and int8 activations (W8A8).

    xq  = quantize(x)            uint8 [M, K]: clip(round(x[m, k] * a[k]) + 128, 0, 255)
    acc = xq @ wq                int32 [M, N]: u8 x s8 products summed in int32 (VNNI)
    y   = acc * scale + offset   float32 [M, N], per output column

or, with dynamic per-token scales, each row m quantized with its own step (its largest
|x * a| / 127, computed at run time) and y = (acc + correction[n]) * step[m] * scale[n].

`a[k]` is 1 / (s_x * smooth[k]): the per-tensor activation step s_x and SmoothQuant's
per-channel factor, applied together. With xq = x / s + 128 and Σ 128 * wq[k, n] folded into
`offset`, y = s_x * s_w[n] * Σ (xq - 128) * wq. The quantize and rescale kernels are
element-wise, so FuseOps fuses them with the layer norm before and the bias, GELU or residual
add after.

On x86 with AVX-512 VNNI the product is a hand-scheduled kernel: `vpdpbusd` (64 u8 x s8
products into 16 int32 per instruction, called as an LLVM intrinsic: TVM's own VNNI tensor
intrinsic fails LLVM 22's signature check), a register tile of rows x vectors x 16 int32
accumulators, the weight packed at compile time as [N/16, K/4, 16 x 4] so one 64-byte load
feeds a whole instruction (tile shapes: `TILES`). Elsewhere (CUDA, or a CPU without VNNI)
it is a plain int32 reduction the schedule rules take.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

# register tiles (rows, 16-column int32 vectors per row), in order of preference: the first
# whose rows divide M and whose columns divide N (single-thread, 1032 x 384 x 1536: 4 x 6 ran
# at 330 GOP/s, 8 x 3 at 235, 8 x 2 at 170; this machine's timings are noisy)
TILES = ((4, 6), (8, 3), (4, 4), (4, 3), (4, 2), (4, 1))


def pack_vnni(wq_nk: np.ndarray) -> np.ndarray:
    """int8 [N, K] -> [N/16, K/4, 64]: for 16 columns and 4 consecutive k, the 64 bytes one
    vpdpbusd multiplies (column-major within the group of 4 k)."""
    n, k = wq_nk.shape
    return np.ascontiguousarray(
        wq_nk.reshape(n // 16, 16, k // 4, 4).transpose(0, 2, 1, 3).reshape(n // 16, k // 4, 64))


def has_vnni(target) -> bool:
    """Whether the target is a CPU with AVX-512 VNNI (the kernel is written for it)."""
    from tvm.target.codegen import target_has_features

    return target is not None and target.kind.name == "llvm" and bool(
        target_has_features(["avx512vnni"], target))


def register_tile(m: int, n: int) -> tuple[int, int] | None:
    return next(((r, v) for r, v in TILES if m % r == 0 and n % (16 * v) == 0), None)


def can_use_vnni(m, k: int, n: int) -> str | None:
    if not isinstance(m, int):
        return "a symbolic row count"
    if register_tile(m, n) is None or k % 4:
        return f"rows {m} a multiple of 4, N {n} of 16 and K {k} of 4"
    return None


def _i64(value: int):
    return tirx.IntImm("int64", value)


def quantize_activation_func(shape: list, k: int) -> tirx.PrimFunc:
    x = te.placeholder([_i64(d) if isinstance(d, int) else d for d in shape], "float32", "x")
    factor = te.placeholder((_i64(k),), "float32", "factor")

    def q(*idx):
        v = tirx.round(x[idx] * factor[idx[-1]]) + tirx.const(128, "float32")
        return tirx.max(tirx.min(v, tirx.const(255, "float32")),
                        tirx.const(0, "float32")).astype("uint8")

    xq = te.compute(x.shape, q, name="quantize_activation")
    return _plain(te.create_prim_func([x, factor, xq]))


def row_steps_func(shape: list, k: int) -> tirx.PrimFunc:
    """Dynamic per-token scales: each row's step, its largest |x * factor| / 127."""
    x = te.placeholder([_i64(d) if isinstance(d, int) else d for d in shape], "float32", "x")
    factor = te.placeholder((_i64(k),), "float32", "factor")
    r = te.reduce_axis((_i64(0), _i64(k)), "r")
    largest = te.compute((x.shape[0],), lambda i: te.max(tirx.abs(x[i, r] * factor[r]), axis=r),
                         name="row_max")
    step = te.compute((x.shape[0],), lambda i: tirx.max(
        largest[i] / tirx.const(127, "float32"), tirx.const(1e-12, "float32")), name="row_step")
    return _plain(te.create_prim_func([x, factor, step]))


def quantize_rows_func(shape: list, k: int) -> tirx.PrimFunc:
    """uint8 x with a step per row: clip(round(x * factor / step[row]) + 128, 0, 255)."""
    x = te.placeholder([_i64(d) if isinstance(d, int) else d for d in shape], "float32", "x")
    factor = te.placeholder((_i64(k),), "float32", "factor")
    step = te.placeholder((x.shape[0],), "float32", "step")

    def q(i, j):
        v = tirx.round(x[i, j] * factor[j] / step[i]) + tirx.const(128, "float32")
        return tirx.max(tirx.min(v, tirx.const(255, "float32")),
                        tirx.const(0, "float32")).astype("uint8")

    xq = te.compute(x.shape, q, name="quantize_rows")
    return _plain(te.create_prim_func([x, factor, step, xq]))


def rescale_rows_func(m, n: int) -> tirx.PrimFunc:
    """y = (acc + correction[n]) * step[m] * scale[n], for per-row activation steps."""
    acc = te.placeholder((_i64(m), _i64(n)), "int32", "acc")
    step = te.placeholder((_i64(m),), "float32", "step")
    scale = te.placeholder((_i64(n),), "float32", "scale")
    correction = te.placeholder((_i64(n),), "float32", "correction")
    y = te.compute(acc.shape, lambda i, j: (acc[i, j].astype("float32") + correction[j])
                   * (step[i] * scale[j]), name="rescale_rows")
    return _plain(te.create_prim_func([acc, step, scale, correction, y]))


def rescale_func(m, n: int) -> tirx.PrimFunc:
    acc = te.placeholder((m if not isinstance(m, int) else _i64(m), _i64(n)), "int32", "acc")
    scale = te.placeholder((_i64(n),), "float32", "scale")
    offset = te.placeholder((_i64(n),), "float32", "offset")
    y = te.compute(acc.shape, lambda i, j: acc[i, j].astype("float32") * scale[j] + offset[j],
                   name="rescale")
    return _plain(te.create_prim_func([acc, scale, offset, y]))


def int8_matmul_func(m: int, k: int, n: int, vnni: bool) -> tirx.PrimFunc:
    if not vnni:
        xq = te.placeholder((_i64(m) if isinstance(m, int) else m, _i64(k)), "uint8", "xq")
        wq = te.placeholder((_i64(n // 16), _i64(k // 4), _i64(64)), "int8", "wq")
        r = te.reduce_axis((_i64(0), _i64(k)), "r")
        acc = te.compute((xq.shape[0], _i64(n)), lambda i, j: te.sum(
            xq[i, r].astype("int32") * wq[j // 16, r // 4, j % 16 * 4 + r % 4].astype("int32"),
            axis=r), name="int8_matmul")
        return _plain(te.create_prim_func([xq, wq, acc]))
    rows, vectors = register_tile(m, n)
    cols = 16 * vectors
    row_tiles = m // rows
    tasks = row_tiles * (n // cols)

    @T.prim_func(private=True)
    def int8_matmul_vnni(xq: T.Buffer((m, k), "uint8"), wq: T.Buffer((n // 16, k // 4, 64), "int8"),
                         out: T.Buffer((m, n), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "Int8MatmulVNNI"})
        for task in T.parallel(tasks):
            acc = T.decl_buffer((rows * cols,), "int32", scope="local")
            i0 = task % row_tiles * rows
            j0 = task // row_tiles * cols
            for r in T.unroll(rows):
                for v in T.unroll(vectors):
                    acc[T.ramp(r * cols + v * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
            for k4 in range(k // 4):
                for r in T.unroll(rows):
                    for v in T.unroll(vectors):
                        acc[T.ramp(r * cols + v * 16, 1, 16)] = T.call_llvm_pure_intrin(
                            "int32x16", "llvm.x86.avx512.vpdpbusd.512",
                            acc[T.ramp(r * cols + v * 16, 1, 16)],
                            T.reinterpret("int8x64", T.broadcast(T.reinterpret(
                                "int32", xq[i0 + r, T.ramp(k4 * 4, 1, 4)]), 16)),
                            wq[j0 // 16 + v, k4, T.ramp(0, 1, 64)])
            for r in T.unroll(rows):
                for v in T.unroll(vectors):
                    out[i0 + r, T.ramp(j0 + v * 16, 1, 16)] = acc[T.ramp(r * cols + v * 16, 1, 16)]

    return int8_matmul_vnni


def _plain(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.without_attr("global_symbol").with_attr("tirx.noalias", True)
