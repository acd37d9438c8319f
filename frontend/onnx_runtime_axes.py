"""ONNX reductions whose `axes` is a tensor computed (or fed) at run time, and Split with
run-time sizes.

TVM's converters take only constant axes. With run-time axes the reduced dims are data, so the
reduction is written so that every shape stays known: for each dim k in turn, the reduction
along k, broadcast back, replaces the data where k is among the axes; the result (the reduced
values repeated along the reduced dims) is then cut to its output shape, computed from the
axes at run time (`dynamic_strided_slice`), and match_cast to fresh size variables, so the
output and everything after it keep symbolic shapes. (A static strided_slice to sizes defined
by a match_cast is not enough: TVM's FuseOps then builds a fused function whose output shape
uses a variable it does not define.) It costs one pass over the data per dim of the input, for
the rare model that needs it; constant axes take TVM's converters as before.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

_INT = "int64"


def _ints(values) -> relax.Expr:
    return relax.const(np.asarray(values, np.int64), _INT)


class _RuntimeAxesReduce:
    """Mixin for the Reduce* converters (opset 13 for ReduceSum, 18 for the others)."""

    combine = staticmethod(relax.op.sum)  # the reduction along one axis
    empty = 0.0  # the reduction of no elements

    @staticmethod
    def before(data):
        return data

    @staticmethod
    def after(bb, reduced, count):
        return reduced

    @classmethod
    def _runtime_axes(cls, bb, inputs, attr, params, fallback):
        axes = inputs[1] if len(inputs) > 1 else None
        if axes is None or isinstance(tvm_onnx.get_constant(axes, params), tvm.ir.GenericConst):
            return fallback(bb, inputs, attr, params)
        data = inputs[0]
        keepdims = bool(attr.get("keepdims", 1))
        length = bb.normalize(axes).ty.shape.values[0]
        if isinstance(length, tirx.IntImm) and int(length) == 0:  # no axes: known statically
            return fallback(bb, [data], attr, params)
        if not isinstance(length, tirx.IntImm):
            raise NotImplementedError("Reduce with an axes tensor of run-time length")
        return cls._reduce(bb, data, axes, int(length), keepdims)

    @classmethod
    def _reduce(cls, bb, data, axes, count_axes, keepdims):
        data = bb.normalize(data)
        rank = data.ty.ndim
        dims = list(data.ty.shape.values)
        dtype = str(data.ty.dtype)
        work_dtype = "int32" if dtype == "bool" else dtype  # max/min over bool
        axes = bb.normalize(relax.op.astype(axes, _INT))
        axes = bb.emit(relax.op.where(relax.op.less(axes, _ints(0)),
                                      relax.op.add(axes, _ints(rank)), axes))
        hits = relax.op.equal(relax.op.expand_dims(axes, 1), _ints(np.arange(rank)[None, :]))
        reduced_dim = bb.emit(relax.op.greater(
            relax.op.max(relax.op.astype(hits, "int32"), axis=[0]), relax.const(0, "int32")))
        shape = bb.emit(relax.op.shape_to_tensor(relax.op.shape_of(data)))
        kept_shape = bb.emit(relax.op.where(reduced_dim, _ints(1), shape))
        if any(isinstance(d, tirx.IntImm) and int(d) == 0 for d in dims):
            return cls._empty(bb, kept_shape, reduced_dim, shape, rank, count_axes, keepdims,
                              dtype)

        values = bb.emit(cls.before(relax.op.astype(data, work_dtype)
                                    if work_dtype != dtype else data))
        for k in range(rank):
            along_k = relax.op.broadcast_to(cls.combine(values, axis=[k], keepdims=True), dims)
            chosen = relax.op.take(reduced_dim, relax.const(k, _INT), axis=0)
            values = bb.emit(relax.op.where(chosen, along_k, values))
        count = relax.op.prod(relax.op.where(reduced_dim, shape, _ints(1)))
        values = bb.emit(cls.after(bb, values, count))
        if work_dtype != dtype:
            values = bb.emit(relax.op.astype(values, dtype))

        result = bb.emit(relax.op.dynamic_strided_slice(values, _ints([0] * rank), kept_shape,
                                                        _ints([1] * rank)))
        result = bb.match_cast(result, relax.TensorType(
            [tirx.Var(f"reduced{i}", _INT) for i in range(rank)], dtype))
        if keepdims:
            return result
        return relax.op.reshape(result, _dims_kept(bb, reduced_dim, shape, rank, count_axes))

    @classmethod
    def _empty(cls, bb, kept_shape, reduced_dim, shape, rank, count_axes, keepdims, dtype):
        """Data with a dim of size 0: the reduction's identity (0, 1, -inf, ...) everywhere."""
        dims = (_symbolic_dims(bb, kept_shape, rank, "reduced") if keepdims
                else _dims_kept(bb, reduced_dim, shape, rank, count_axes))
        if dtype == "bool":
            return relax.op.full(dims, relax.const(bool(cls.empty > 0), dtype), dtype)
        if np.isfinite(cls.empty):
            return relax.op.full(dims, relax.const(cls.empty, dtype), dtype)
        # full() of an infinite constant does not legalize in TVM 0.27
        ones = relax.op.full(dims, relax.const(1, dtype), dtype)
        return relax.op.multiply(ones, relax.const(cls.empty, dtype))


def _dims_kept(bb, reduced_dim, shape, rank, count_axes) -> list[tirx.Var]:
    """The sizes of the dims not reduced, in order, as fresh size variables."""
    order = relax.op.argsort(relax.op.add(  # dim indices with the reduced ones pushed last
        relax.op.multiply(relax.op.astype(reduced_dim, _INT), _ints(rank)),
        _ints(np.arange(rank))))
    out_rank = rank - count_axes
    staying = relax.op.strided_slice(order, [0], [0], [out_rank])
    return _symbolic_dims(bb, relax.op.take(shape, staying, axis=0), out_rank, "kept")


def _symbolic_dims(bb, tensor, length, prefix) -> list[tirx.Var]:
    """Fresh size variables holding a 1-D int64 tensor's values at run time."""
    dims = [tirx.Var(f"{prefix}{i}", _INT) for i in range(length)]
    shape = bb.emit(relax.op.tensor_to_shape(bb.normalize(tensor)))
    bb.match_cast(shape, relax.ShapeType(dims))
    return dims


def _subclass(base, version, **overrides):
    fallback = getattr(base, f"_impl_v{version}")

    def impl(cls, bb, inputs, attr, params):
        return cls._runtime_axes(bb, inputs, attr, params, fallback)

    namespace = {f"_impl_v{version}": classmethod(impl), **overrides}
    return type(base.__name__, (_RuntimeAxesReduce, base), namespace)


def _square(x):
    return relax.op.multiply(x, x)


def _mean(bb, reduced, count):
    return relax.op.divide(reduced, relax.op.astype(count, str(bb.normalize(reduced).ty.dtype)))


def _l2(bb, reduced, count):
    return relax.op.sqrt(reduced)


def _log(bb, reduced, count):
    return relax.op.log(reduced)


def _log_sum_exp(data, axis, keepdims):
    peak = relax.op.max(data, axis=axis, keepdims=True)
    total = relax.op.sum(relax.op.exp(relax.op.subtract(data, peak)), axis=axis, keepdims=True)
    return relax.op.add(relax.op.log(total), peak)


class Split(tvm_onnx.Split):
    """`split` sizes given as a run-time tensor (of static length): each part is sliced by the
    run-time offsets and given fresh size variables for its length."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        sizes = inputs[1] if len(inputs) > 1 else None
        if sizes is None or isinstance(tvm_onnx.get_constant(sizes, params), tvm.ir.GenericConst):
            return super()._impl_v13(bb, inputs, attr, params)
        data = bb.normalize(inputs[0])
        rank = data.ty.ndim
        axis = attr.get("axis", 0) % rank
        parts = bb.normalize(sizes).ty.shape.values[0]
        if not isinstance(parts, tirx.IntImm):
            raise NotImplementedError("Split into a run-time number of parts")
        sizes = bb.emit(relax.op.astype(sizes, _INT))
        ends = bb.emit(relax.op.cumsum(sizes, axis=0))
        begins = bb.emit(relax.op.subtract(ends, sizes))
        shape = bb.emit(relax.op.shape_to_tensor(relax.op.shape_of(data)))
        zeros, ones = _ints([0] * rank), _ints([1] * rank)
        outputs = []
        for i in range(int(parts)):
            one_hot = _ints(np.eye(rank, dtype=np.int64)[axis])
            index = relax.const(i, _INT)
            begin = relax.op.multiply(one_hot, relax.op.take(begins, index, axis=0))
            end = relax.op.where(relax.op.equal(one_hot, _ints(1)),
                                 relax.op.take(ends, index, axis=0), shape)
            part = bb.emit(relax.op.dynamic_strided_slice(data, bb.emit(relax.op.add(zeros, begin)),
                                                          bb.emit(end), ones))
            dims = list(data.ty.shape.values)
            dims[axis] = tirx.Var(f"part{i}", _INT)
            outputs.append(bb.match_cast(part, relax.TensorType(dims, str(data.ty.dtype))))
        return relax.Tuple(outputs)

    _impl_v18 = _impl_v13


CONVERTERS = {
    "Split": Split,
    "ReduceSum": _subclass(tvm_onnx.ReduceSum, 13),
    "ReduceMean": _subclass(tvm_onnx.ReduceMean, 18, after=staticmethod(_mean)),
    "ReduceMax": _subclass(tvm_onnx.ReduceMax, 18, combine=staticmethod(relax.op.max),
                           empty=-np.inf),
    "ReduceMin": _subclass(tvm_onnx.ReduceMin, 18, combine=staticmethod(relax.op.min),
                           empty=np.inf),
    "ReduceProd": _subclass(tvm_onnx.ReduceProd, 18, combine=staticmethod(relax.op.prod),
                            empty=1.0),
    "ReduceL1": _subclass(tvm_onnx.ReduceL1, 18, before=staticmethod(relax.op.abs)),
    "ReduceL2": _subclass(tvm_onnx.ReduceL2, 18, before=staticmethod(_square),
                          after=staticmethod(_l2)),
    "ReduceSumSquare": _subclass(tvm_onnx.ReduceSumSquare, 18, before=staticmethod(_square)),
    "ReduceLogSum": _subclass(tvm_onnx.ReduceLogSum, 18, after=staticmethod(_log),
                              empty=-np.inf),
    "ReduceLogSumExp": _subclass(tvm_onnx.ReduceLogSumExp, 18,
                                 combine=staticmethod(_log_sum_exp), empty=-np.inf),
}
