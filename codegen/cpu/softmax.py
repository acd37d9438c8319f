"""Softmax over rows whose length is symbolic (attention scores over a cache of any length).

The schedule rules vectorize a loop only when its length is a known multiple of the vector
width: TVM scalarizes a vector loop with a tail predicate, `loop_partition` refuses symbolic
extents, and buffer-level predication fails LLVM's signature check for the lane mask. So this
kernel is written scheduled, each row as three passes of whole vectors plus a scalar tail:
the row maximum, exp(x - max) stored and summed, then the scaling by 1 / sum. Rows run in
parallel. exp is the fast approximation `FastMathTransform` uses elsewhere (float32 rounding
level). Relax routes softmax over a symbolic last axis here (`rewrites/symbolic_softmax.py`).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # float32 per AVX-512 register


def fast_exp(x):
    """exp(x) for float32 (scalar or vector) PrimExprs: 2^n times a degree-7 polynomial of the
    remainder, as topi's fast_exp."""
    lanes = x.ty.dtype.lanes
    float_t, int_t = ("float32", "int32") if lanes == 1 else \
        (f"float32x{lanes}", f"int32x{lanes}")

    def const(value, dtype="float32"):
        c = tirx.const(value, dtype)
        return c if lanes == 1 else tirx.Broadcast(c, lanes)

    x = tirx.max(tirx.min(x, const(88.3762626647950)), const(-88.3762626647949))
    n = tirx.floor(x * const(1.44269504088896341) + const(0.5))
    r = x - n * const(0.693147181)
    poly = const(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        poly = poly * r + const(c)
    poly = poly * r * r + r + const(1.0)
    exponent = tirx.shift_left(tirx.Cast(int_t, n) + const(127, "int32"), const(23, "int32"))
    return tirx.call_intrin(float_t, "tirx.reinterpret", exponent) * poly


def softmax_rows_func() -> tirx.PrimFunc:
    """y[r, :] = softmax(x[r, :]) for x [rows, n], both symbolic."""
    vec = LANES

    @T.prim_func(private=True, s_tir=True)  # in a root block, as Relax's passes expect
    def softmax_rows(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "RowSoftmax"})
        rows, n = T.int64(), T.int64()
        x = T.match_buffer(var_x, (rows, n), "float32")
        y = T.match_buffer(var_y, (rows, n), "float32")
        with T.sblock("root"):
            for r in T.parallel(rows):
                acc = T.decl_buffer((vec,), "float32", scope="local")
                total = T.decl_buffer((2,), "float32", scope="local")
                acc[T.ramp(0, 1, vec)] = T.broadcast(T.float32(-3.4028234663852886e38), vec)
                for c in range(n // vec):
                    acc[T.ramp(0, 1, vec)] = T.max(acc[T.ramp(0, 1, vec)],
                                                   x[r, T.ramp(c * vec, 1, vec)])
                total[0] = T.float32(-3.4028234663852886e38)
                for lane in range(vec):
                    total[0] = T.max(total[0], acc[lane])
                for c in range(n // vec * vec, n):
                    total[0] = T.max(total[0], x[r, c])
                acc[T.ramp(0, 1, vec)] = T.broadcast(T.float32(0), vec)
                for c in range(n // vec):
                    y[r, T.ramp(c * vec, 1, vec)] = fast_exp(
                        x[r, T.ramp(c * vec, 1, vec)] - T.broadcast(total[0], vec))
                    acc[T.ramp(0, 1, vec)] = acc[T.ramp(0, 1, vec)] + y[r, T.ramp(c * vec, 1, vec)]
                total[1] = T.float32(0)
                for lane in range(vec):
                    total[1] = total[1] + acc[lane]
                for c in range(n // vec * vec, n):
                    y[r, c] = fast_exp(x[r, c] - total[0])
                    total[1] = total[1] + y[r, c]
                total[1] = T.float32(1) / total[1]
                for c in range(n // vec):
                    y[r, T.ramp(c * vec, 1, vec)] = y[r, T.ramp(c * vec, 1, vec)] * \
                        T.broadcast(total[1], vec)
                for c in range(n // vec * vec, n):
                    y[r, c] = y[r, c] * total[1]

    return softmax_rows
