"""ONNX ops whose output shape may be a value the graph computes or takes at run time (Expand,
Pad, CenterCropPad, Reshape, TopK, OneHot, a Shape read as a tensor), fixes of TVM's IsInf,
EyeLike and Trilu, and the helpers the other converter modules share.

A crop's target shape, a padded length: when the value is a constant the converters use it as
it is; otherwise it is read at run time (`tensor_to_shape`) and match_cast into fresh size
variables (`sizes_of`), so the output has a symbolic shape and what follows it compiles as for
any other symbolic dim.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

def constant_values(expr, params) -> np.ndarray | None:
    """The value of `expr` when it is known while importing, else None."""
    value = tvm_onnx.get_constant(expr, params)
    if isinstance(value, tvm.ir.GenericConst):
        return value.value.numpy()
    if isinstance(value, relax.ShapeExpr) and all(isinstance(v, tirx.IntImm)
                                                  for v in value.values):
        return np.asarray([int(v) for v in value.values], np.int64)
    return None


def optional_input(inputs, index):
    """Input `index` of a node, or None where it is omitted (absent or given as '')."""
    return inputs[index] if len(inputs) > index and inputs[index] is not None else None


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
    # the same name in every compile (dumps of two compiles diff cleanly); TVM's printer tells
    # apart two sizes of one name
    dims = [tirx.Var(f"{name}{i}", "int64") for i in range(int(count))]
    bb.match_cast(bb.emit(relax.op.tensor_to_shape(expr)), relax.ShapeType(dims))
    return dims


class Expand(tvm_onnx.Expand):
    """A run-time shape broadcasts as ONNX says, each dim the larger of the data's and the
    shape's (TVM's converter takes the shape's, even where it is 1 and the data's is not, and
    reads it with an impure call inside the dataflow block)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs
        known = constant_values(shape, params)
        if known is not None:  # as a constant (an initializer reaches TVM's converter as a var)
            return super()._impl_v13(bb, [data, relax.const(known, "int64")], attr, params)
        if isinstance(shape, relax.ShapeExpr):
            return super()._impl_v13(bb, inputs, attr, params)
        wanted = sizes_of(bb, shape, params, "expand")
        dims = list(bb.normalize(data).ty.shape.values)
        rank = max(len(dims), len(wanted))
        dims = [1] * (rank - len(dims)) + dims
        wanted = [1] * (rank - len(wanted)) + wanted
        return relax.op.broadcast_to(data, relax.ShapeExpr(
            [tirx.max(tirx.IntImm("int64", d) if isinstance(d, int) else d, w)
             for d, w in zip(dims, wanted)]))


class CenterCropPad(tvm_onnx.OnnxOpConverter):
    """Each listed axis cut or zero-padded, centred, to the length `shape` gives (which may be
    a run-time value): output position j reads input position j + offset, offset being half
    the difference of the lengths, rounded toward zero, as the ONNX reference does."""

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        data, shape = inputs
        data = bb.normalize(data)
        rank = data.ty.ndim
        axes = [a + rank if a < 0 else a for a in attr.get("axes", range(rank))]
        lengths = sizes_of(bb, shape, params, "center_crop_pad")
        shape = bb.normalize(relax.op.astype(shape, "int64"))
        int64 = "int64"
        for position, (axis, length) in enumerate(zip(axes, lengths)):
            have = dim_tensor(data.ty.shape.values[axis])
            want = relax.op.take(shape, relax.const(position, int64), axis=0)
            difference = bb.normalize(relax.op.subtract(have, want))
            half = relax.op.floor_divide(relax.op.abs(difference), relax.const(2, int64))
            offset = relax.op.where(relax.op.less(difference, relax.const(0, int64)),
                                    relax.op.negative(half), half)
            data = _read_along(bb, data, axis, length, bb.normalize(relax.op.negative(offset)))
        return data


class IsInf(tvm_onnx.IsInf):
    """detect_positive / detect_negative choose which infinities count (TVM ignores them)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        found = relax.op.isinf(x)
        zero = relax.const(0, str(bb.normalize(x).ty.dtype))
        if not attr.get("detect_positive", 1):
            found = relax.op.logical_and(found, relax.op.less(x, zero))
        if not attr.get("detect_negative", 1):
            found = relax.op.logical_and(found, relax.op.greater(x, zero))
        return found


class EyeLike(tvm_onnx.EyeLike):
    """The output dtype is the `dtype` attribute where given (TVM refuses one that differs
    from the input's)."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        dtype = (tvm_onnx.get_type(attr["dtype"]) if "dtype" in attr
                 else str(bb.normalize(inputs[0]).ty.dtype))
        return relax.op.eye_like(inputs[0], attr.get("k", 0), dtype)


class Trilu(tvm_onnx.Trilu):
    """An empty input is its own result (TVM's converter fails on it)."""

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        dims = bb.normalize(inputs[0]).ty.shape.values
        if any(isinstance(d, tirx.IntImm) and int(d) == 0 for d in dims):
            return inputs[0]
        return super()._impl_v14(bb, inputs, attr, params)


def dim_tensor(dim) -> relax.Expr:
    """A shape dim (int or symbolic) as an int64 scalar tensor."""
    return relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([dim])), ())


def _read_along(bb, data, axis, length, shift, mode="constant", fill=None):
    """`data` read along `axis` at positions j - shift for j < length (shift: int64 scalar
    tensor); positions outside the input read `fill` (constant), the nearest edge (edge), the
    mirror image (reflect) or wrap around (wrap)."""
    int64 = "int64"
    data = bb.normalize(data)
    rank = data.ty.ndim
    have = bb.normalize(dim_tensor(data.ty.shape.values[axis]))
    source = bb.normalize(relax.op.subtract(relax.op.arange(0, length, 1, int64), shift))
    zero, one = relax.const(0, int64), relax.const(1, int64)
    last = relax.op.subtract(have, one)
    if mode == "reflect":
        period = relax.op.maximum(relax.op.multiply(last, relax.const(2, int64)), one)
        folded = relax.op.floor_mod(source, period)
        source = relax.op.where(relax.op.less(folded, have), folded,
                                relax.op.subtract(period, folded))
    elif mode == "wrap":
        source = relax.op.floor_mod(source, have)
    clamped = relax.op.maximum(relax.op.minimum(source, last), zero)
    picked = bb.normalize(relax.op.take(data, clamped, axis=axis))
    if mode != "constant":
        return picked
    inside = relax.op.logical_and(relax.op.greater_equal(source, zero),
                                  relax.op.less(source, have))
    mask = relax.op.reshape(inside, [length] + [1] * (rank - axis - 1))
    fill = fill if fill is not None else relax.op.zeros_like(picked)
    return bb.normalize(relax.op.where(mask, picked, fill))


class Pad(tvm_onnx.Pad):
    """Pads given at run time (a crop where negative): each padded axis is a read with shifted
    positions (`_read_along`), its new length a run-time size."""

    @classmethod
    def _lower_pad(cls, bb, inputs, attr, params, allowed_modes):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        if constant_values(inputs[1], params) is not None:
            return super()._lower_pad(bb, inputs, attr, params, allowed_modes)
        mode = attr.get("mode", b"constant").decode("utf-8")
        if mode not in allowed_modes:
            raise ValueError(f"Pad mode {mode!r} is not one of {sorted(allowed_modes)}")
        data = bb.normalize(inputs[0])
        rank = data.ty.ndim
        axes = list(range(rank))
        pads = bb.normalize(relax.op.astype(inputs[1], "int64"))
        if inputs[3] is not None:
            known = constant_values(inputs[3], params)
            if known is None:
                pads = _pads_of_every_axis(bb, pads, inputs[3], rank)
            else:
                axes = [int(a) + rank if a < 0 else int(a) for a in known.reshape(-1)]
        fill = None
        if inputs[2] is not None and mode == "constant":
            fill = relax.op.astype(relax.op.reshape(inputs[2], ()), str(data.ty.dtype))
        int64 = "int64"
        for position, axis in enumerate(axes):
            before = relax.op.take(pads, relax.const(position, int64), axis=0)
            after = relax.op.take(pads, relax.const(position + len(axes), int64), axis=0)
            have = dim_tensor(data.ty.shape.values[axis])
            (length,) = sizes_of(bb, relax.op.add(relax.op.add(have, before), after), params,
                                 "pad")
            out_dims = list(data.ty.shape.values)
            out_dims[axis] = length
            axis_fill = (None if fill is None else
                         relax.op.broadcast_to(fill, relax.ShapeExpr(out_dims)))
            data = _read_along(bb, data, axis, length, bb.normalize(before), mode, axis_fill)
        return data



def _pads_of_every_axis(bb, pads, axes, rank):
    """Pads for the axes listed at run time, [before..., after...], spread over every axis
    (zero for the unlisted ones)."""
    int64 = "int64"
    axes = bb.normalize(relax.op.astype(axes, int64))
    count = int(axes.ty.shape.values[0])
    axes = relax.op.where(relax.op.less(axes, relax.const(0, int64)),
                          relax.op.add(axes, relax.const(rank, int64)), axes)
    listed = relax.op.astype(relax.op.equal(relax.op.expand_dims(axes, 1), relax.const(
        np.arange(rank, dtype=np.int64), int64)), int64)  # [count, rank]
    spread = [relax.op.sum(relax.op.multiply(listed, relax.op.expand_dims(
        relax.op.strided_slice(pads, [0], [start], [start + count]), 1)), axis=0)
        for start in (0, count)]
    return bb.normalize(relax.op.concat(spread, axis=0))


class ShapeAsTensor(tvm_onnx.OnnxOpConverter):
    """`Shape` as an int64 tensor (onnx_fixes renames a Shape whose consumers cannot take the
    shape value TVM's converter returns)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        data = bb.normalize(inputs[0])
        dims = list(data.ty.shape.values)[attr.get("start", 0):attr.get("end")]
        if not dims:
            return relax.const(np.zeros((0,), np.int64), "int64")
        return relax.op.shape_to_tensor(relax.ShapeExpr(dims))











class Reshape(tvm_onnx.Reshape):
    """A target shape given at run time: its 0 entries copy the input's dim (unless
    allowzero) and a -1 takes what is left of the element count, computed as tensors, and the
    result read as the output's shape."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, target = inputs
        if (isinstance(target, relax.ShapeExpr) or isinstance(data, relax.ShapeExpr)
                or constant_values(target, params) is not None):
            return super()._impl_v13(bb, inputs, attr, params)
        int64 = "int64"
        data = bb.normalize(data)
        target = bb.normalize(relax.op.astype(target, int64))
        count = target.ty.shape.values[0]
        if not isinstance(count, tirx.IntImm):
            raise NotImplementedError("Reshape to a shape tensor of run-time length")
        count, dims = int(count), list(data.ty.shape.values)
        zero, one = relax.const(0, int64), relax.const(1, int64)
        if not attr.get("allowzero", 0):
            copied = relax.op.shape_to_tensor(relax.ShapeExpr(
                dims[:count] + [0] * max(0, count - len(dims))))
            target = relax.op.where(relax.op.logical_and(
                relax.op.equal(target, zero),
                relax.const(np.arange(count) < len(dims))), copied, target)
        target = bb.normalize(target)
        minus_one = relax.op.equal(target, relax.const(-1, int64))
        others = relax.op.prod(relax.op.where(minus_one, one, target))
        total = dim_tensor(tirx.const(1, int64) if not dims else
                           functools.reduce(lambda a, b: a * b, dims))
        rest = relax.op.floor_divide(total, relax.op.maximum(others, one))
        target = bb.normalize(relax.op.where(minus_one, rest, target))
        return relax.op.reshape(data, sizes_of(bb, target, params, "reshape"))


class TopK(tvm_onnx.TopK):
    """k given at run time: the whole axis sorted, and its first k entries kept."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        if constant_values(inputs[1], params) is not None:
            return super()._impl_v11(bb, inputs, attr, params)
        data = bb.normalize(inputs[0])
        axis = attr.get("axis", -1) % data.ty.ndim
        length = data.ty.shape.values[axis]
        if not isinstance(length, tirx.IntImm):
            raise NotImplementedError("TopK with a run-time k along an axis of run-time length")
        ordered = bb.normalize(relax.op.topk(data, int(length), axis, ret_type="both",
                                             largest=bool(attr.get("largest", 1)),
                                             dtype="int64"))
        (k,) = sizes_of(bb, inputs[1], params, "topk")
        return relax.Tuple([relax.op.strided_slice(relax.TupleGetItem(ordered, i), [axis], [0],
                                                   [k], assume_inbound=True) for i in (0, 1)])


class OneHot(tvm_onnx.OnnxOpConverter):
    """depth and values may be run-time tensors (TVM takes only constants); indices of any
    numeric type, negative ones counted from the end, out-of-range ones giving all-off rows."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        indices, depth, values = (bb.normalize(x) for x in inputs)
        int64 = "int64"
        depth_tensor = bb.normalize(relax.op.reshape(relax.op.astype(depth, int64), ()))
        (length,) = sizes_of(bb, depth_tensor, params, "depth")
        rank = indices.ty.ndim + 1
        axis = attr.get("axis", -1) % rank
        index = bb.normalize(relax.op.astype(indices, int64))
        index = relax.op.where(relax.op.less(index, relax.const(0, int64)),
                               relax.op.add(index, depth_tensor), index)
        positions = relax.op.reshape(relax.op.arange(0, length, 1, int64),
                                     [length if d == axis else 1 for d in range(rank)])
        hot = relax.op.equal(relax.op.expand_dims(index, axis), positions)
        off, on = (relax.op.take(values, relax.const(i, int64), axis=0) for i in (0, 1))
        return relax.op.where(hot, on, off)


CONVERTERS = {"Reshape": Reshape, "TopK": TopK, "OneHot": OneHot, "Expand": Expand,
              "CenterCropPad": CenterCropPad, "IsInf": IsInf, "EyeLike": EyeLike, "Trilu": Trilu,
              "Pad": Pad, "ShapeAsTensor": ShapeAsTensor}
