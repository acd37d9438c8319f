"""graft's own converters for ONNX ops that TVM's importer gets wrong on real exports.

They replace TVM's converter of the same op type for the duration of an import.

- Range with a symbolic limit (`Range(0, Squeeze(Shape(x)[0:1]), 1)`, written by the dynamo
  exporter for attention masks): TVM computes the length with tensor ops and match_casts it into
  a fresh variable, so the mask's shape no longer relates to `batch`/`seq`, later ops lose their
  shapes, and a Reshape with -1 fails. Emitting `R.arange(start, limit, delta)` on the
  symbolic values keeps the shape `(limit,)`.
- ConstantOfShape of an empty shape (a rank-0 tensor): TVM emits
  `broadcast_to(const of shape (1,), R.shape([]))`, which fails; this returns a scalar constant.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


def _int_or_symbolic(value):
    if isinstance(value, tvm.ir.GenericConst):
        array = value.value.numpy()
        if array.size == 1 and np.issubdtype(array.dtype, np.integer):
            return int(array.reshape(()))
        return None
    if tvm.ir.is_prim_expr(value) and "int" in str(getattr(value, "dtype", None) or value.ty):
        return value
    return None


class Range(tvm_onnx.Range):
    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        values = [_int_or_symbolic(tvm_onnx.get_constant(i, params)) for i in inputs[:3]]
        if all(v is not None for v in values) and any(not isinstance(v, int) for v in values):
            start, limit, delta = values
            ty = getattr(inputs[0], "ty", None)
            if ty is not None and hasattr(ty, "dtype"):
                dtype = str(ty.dtype)
            elif tvm.ir.is_prim_expr(inputs[0]):
                dtype = str(inputs[0].ty)
            else:
                dtype = "int64"
            if isinstance(delta, int) and delta > 0:
                return relax.op.arange(start, limit, delta, dtype=dtype)
        return super()._impl_v12(bb, inputs, attr, params)


class ConstantOfShape(tvm_onnx.ConstantOfShape):
    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        shape = tvm_onnx.get_constant(inputs[0], params)
        if isinstance(shape, tvm.ir.GenericConst) and shape.value.numpy().size == 0:
            value = attr.get("value")
            scalar = np.asarray(tvm_onnx.get_numpy(value).reshape(()) if value is not None
                                else np.float32(0))
            return relax.const(scalar, str(scalar.dtype))
        return super()._impl_v9(bb, inputs, attr, params)


CONVERTERS = {"Range": Range, "ConstantOfShape": ConstantOfShape}
