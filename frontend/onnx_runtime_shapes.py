"""ONNX ops whose output shape is a value the graph computes or takes at run time.

A window's length, a crop's target shape, a grid's size: when the value is a constant the
converters use it as it is; otherwise it is read at run time (`tensor_to_shape`) and
match_cast into fresh size variables, so the output has a symbolic shape and what follows it
compiles as for any other symbolic dim.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

_fresh = itertools.count()


def constant_values(expr, params) -> np.ndarray | None:
    """The value of `expr` when it is known while importing, else None."""
    value = tvm_onnx.get_constant(expr, params)
    if isinstance(value, tvm.ir.GenericConst):
        return value.value.numpy()
    if isinstance(value, relax.ShapeExpr) and all(isinstance(v, tirx.IntImm)
                                                  for v in value.values):
        return np.asarray([int(v) for v in value.values], np.int64)
    return None


def sizes_of(bb, expr, params, name: str) -> list:
    """The int64 values of a 1-D (or scalar) integer tensor as shape dims: ints where they are
    known while importing, symbolic sizes read at run time otherwise."""
    known = constant_values(expr, params)
    if known is not None:
        return [int(v) for v in np.asarray(known).reshape(-1)]
    if isinstance(expr, relax.ShapeExpr):
        return list(expr.values)
    expr = bb.normalize(expr)
    if expr.ty.ndim == 0:
        expr = relax.op.reshape(expr, (1,))
    expr = bb.normalize(relax.op.astype(expr, "int64"))
    count = expr.ty.shape.values[0]
    if not isinstance(count, tirx.IntImm):
        raise NotImplementedError(f"{name}: a shape tensor of run-time length")
    tag = next(_fresh)
    dims = [tirx.Var(f"{name}_{tag}_{i}", "int64") for i in range(int(count))]
    bb.match_cast(bb.emit(relax.op.tensor_to_shape(expr)), relax.ShapeType(dims))
    return dims


class _Window(tvm_onnx.OnnxOpConverter):
    """`sum_k coefficient_k * cos(2 pi k n / N)`, N the length (less one when not periodic),
    computed in float64 as the ONNX reference does."""

    coefficients: tuple = ()

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        (length,) = sizes_of(bb, inputs[0], params, f"{cls.__name__}_size")
        periodic = bool(attr.get("periodic", 1))
        dtype = tvm_onnx.get_type(attr.get("output_datatype", 1))
        period = relax.op.astype(inputs[0], "float64")
        if not periodic:
            period = relax.op.subtract(period, relax.const(1.0, "float64"))
        n = relax.op.arange(0, length, 1, "float64")
        phase = relax.op.divide(relax.op.multiply(n, relax.const(2 * math.pi, "float64")),
                                period)
        window = relax.const(cls.coefficients[0], "float64")
        for k, coefficient in enumerate(cls.coefficients[1:], start=1):
            harmonic = relax.op.cos(relax.op.multiply(phase, relax.const(float(k), "float64")))
            window = relax.op.add(window, relax.op.multiply(harmonic,
                                                            relax.const(coefficient, "float64")))
        return relax.op.astype(window, dtype)


class HannWindow(_Window):
    coefficients = (0.5, -0.5)


class HammingWindow(_Window):
    coefficients = (25 / 46, -(1 - 25 / 46))


class BlackmanWindow(_Window):
    coefficients = (0.42, -0.5, 0.08)


class Expand(tvm_onnx.Expand):
    """A run-time shape broadcasts as ONNX says, each dim the larger of the data's and the
    shape's (TVM's converter takes the shape's, even where it is 1 and the data's is not, and
    reads it with an impure call inside the dataflow block)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs
        if constant_values(shape, params) is not None or isinstance(shape, relax.ShapeExpr):
            return super()._impl_v13(bb, inputs, attr, params)
        wanted = sizes_of(bb, shape, params, "expand")
        dims = list(bb.normalize(data).ty.shape.values)
        rank = max(len(dims), len(wanted))
        dims = [1] * (rank - len(dims)) + dims
        wanted = [1] * (rank - len(wanted)) + wanted
        return relax.op.broadcast_to(data, relax.ShapeExpr(
            [tirx.max(tirx.IntImm("int64", d) if isinstance(d, int) else d, w)
             for d, w in zip(dims, wanted)]))


CONVERTERS = {"HannWindow": HannWindow, "HammingWindow": HammingWindow,
              "BlackmanWindow": BlackmanWindow, "Expand": Expand}
