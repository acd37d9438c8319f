"""graft's own converters for ONNX ops that TVM's importer gets wrong on real exports.

They replace TVM's converter of the same op type for the duration of an import.

- Range with a symbolic limit (`Range(0, Squeeze(Shape(x)[0:1]), 1)`, written by the dynamo
  exporter for attention masks): TVM computes the length with tensor ops and match_casts it into
  a fresh variable, so the mask's shape no longer relates to `batch`/`seq`, later ops lose their
  shapes, and a Reshape with -1 fails. Emitting `R.arange(start, limit, delta)` on the
  symbolic values keeps the shape `(limit,)`.
- ConstantOfShape of an empty shape (a rank-0 tensor): TVM emits
  `broadcast_to(const of shape (1,), R.shape([]))`, which fails; this returns a scalar constant.
- ConvInteger, QLinearConv and QLinearMatMul, which onnxruntime's quantizers write (dynamic
  quantization of convolutions; static quantization in the QOperator format), are missing from
  TVM. They accumulate in int32 exactly as the ONNX reference does, and requantize as it does:
  `round_half_even(acc * (x_scale * w_scale / y_scale)) + y_zero_point`, saturated.
- NonMaxSuppression with its limits given at run time: TVM's op takes them as tensors, but its
  legalization applies a run-time max_output_boxes_per_class as the box count; the rows past
  the limit in each (batch, class) group are dropped after it.
- Reduce* with axes given as a run-time tensor: onnx_runtime_axes.py.
- RNN, GRU, LSTM: onnx_recurrent.py. DFT: onnx_dft.py. Resize and Upsample: onnx_resize.py.
- Ops whose output shape may be a run-time value (Expand, Pad, CenterCropPad) and fixes of
  IsInf, EyeLike, Trilu: onnx_runtime_shapes.py. Window functions, STFT, MelWeightMatrix:
  onnx_signal.py. AffineGrid, Col2Im, DeformConv, MaxPool's indices: onnx_vision.py. Det,
  TfIdfVectorizer, Binarizer, ArrayFeatureExtractor: onnx_extra_ops.py. The ONNX Attention op:
  onnx_attention.py. Casts to and from float8, and float8 or blocked
  QuantizeLinear/DequantizeLinear: onnx_float8.py. The two losses: onnx_losses.py. RotaryEmbedding,
  SwiGLU, Swish, TensorScatter, BitCast, CumProd, Celu, ReverseSequence: onnx_recent_ops.py.
  CausalConvWithState and LinearAttention: onnx_linear_attention.py. Scan is unrolled before
  import (onnx_scan.py).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend import (onnx_attention, onnx_dft, onnx_extra_ops, onnx_float8,
                            onnx_linear_attention, onnx_losses, onnx_recent_ops,
                            onnx_recurrent, onnx_resize, onnx_runtime_axes, onnx_runtime_shapes,
                            onnx_signal, onnx_vision)
from graft.frontend.onnx_runtime_shapes import dim_tensor, optional_input


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
        value = attr.get("value")
        scalar = np.asarray(tvm_onnx.get_numpy(value).reshape(()) if value is not None
                            else np.float32(0))
        if isinstance(shape, tvm.ir.GenericConst) and shape.value.numpy().size == 0:
            return relax.const(scalar, str(scalar.dtype))
        if isinstance(shape, relax.ShapeExpr) or isinstance(shape, tvm.ir.GenericConst):
            return super()._impl_v9(bb, inputs, attr, params)
        # a shape tensor computed at run time: TVM's converter leaves a dataflow var in the type
        dims = onnx_runtime_shapes.sizes_of(bb, inputs[0], params, "filled")
        return relax.op.full(relax.ShapeExpr(dims), relax.const(scalar, str(scalar.dtype)),
                             str(scalar.dtype))


def _minus_zero_point(bb, value, zero_point, channel_axis=None):
    """`value - zero_point` in int32; a per-channel zero point (shape [C]) is laid along
    `channel_axis` of `value`."""
    value = relax.op.astype(value, "int32")
    if zero_point is None:
        return value
    zero_point = bb.normalize(relax.op.astype(zero_point, "int32"))
    if channel_axis is not None and len(zero_point.ty.shape) == 1:
        zero_point = _along_axis(zero_point, channel_axis, bb.normalize(value).ty.ndim)
    return relax.op.subtract(value, zero_point)


def _along_axis(vector, axis, ndim):
    """A [C] vector shaped to broadcast along `axis` of a rank-`ndim` tensor."""
    axis = axis % ndim
    return relax.op.reshape(vector, [-1] + [1] * (ndim - 1 - axis)) if axis < ndim - 1 else vector


def _requantize(bb, accumulator, multiplier, zero_point, out_dtype):
    """`saturate(round_half_even(accumulator * multiplier) + zero_point)` as `out_dtype`."""
    info = np.iinfo(out_dtype)
    scaled = relax.op.round(relax.op.multiply(relax.op.astype(accumulator, "float32"), multiplier))
    if zero_point is not None:
        scaled = relax.op.add(scaled, relax.op.astype(zero_point, "float32"))
    return relax.op.astype(relax.op.clip(scaled, int(info.min), int(info.max)), out_dtype)


def _float32(bb, scale):
    """Scales may be float16 (opset 21); the requantization computes in float32."""
    scale = bb.normalize(scale)
    return scale if str(scale.ty.dtype) == "float32" else bb.normalize(
        relax.op.astype(scale, "float32"))


def _dtype(bb, expr) -> str:
    return str(bb.normalize(expr).ty.dtype.dtype)


class ConvInteger(tvm_onnx.OnnxOpConverter):
    """int32 convolution of (x - x_zero_point) and (w - w_zero_point); padding is with zeros
    after the zero point is taken off, as in the ONNX reference."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = _minus_zero_point(bb, inputs[0], optional_input(inputs, 2))
        w = _minus_zero_point(bb, inputs[1], optional_input(inputs, 3), channel_axis=0)
        return tvm_onnx.Conv._impl_v11(bb, [bb.normalize(x), bb.normalize(w), None], attr, params)


class QLinearConv(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point = inputs[:8]
        bias = optional_input(inputs, 8)
        x_int = _minus_zero_point(bb, x, x_zero_point)
        w_int = _minus_zero_point(bb, w, w_zero_point, channel_axis=0)
        accumulator = bb.normalize(tvm_onnx.Conv._impl_v11(
            bb, [bb.normalize(x_int), bb.normalize(w_int), None], attr, params))
        ndim = accumulator.ty.ndim
        if bias is not None:
            accumulator = relax.op.add(
                accumulator, relax.op.reshape(bb.normalize(relax.op.astype(bias, "int32")), [1, -1] + [1] * (ndim - 2)))
        x_scale, w_scale, y_scale = (_float32(bb, s) for s in (x_scale, w_scale, y_scale))
        if len(w_scale.ty.shape) == 1:
            w_scale = relax.op.reshape(w_scale, [1, -1] + [1] * (ndim - 2))
        multiplier = relax.op.divide(relax.op.multiply(x_scale, w_scale), y_scale)
        out_dtype = _dtype(bb, y_zero_point) if y_zero_point is not None else "uint8"
        return _requantize(bb, accumulator, multiplier, y_zero_point, out_dtype)


class QLinearMatMul(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point = inputs[:8]
        a_int = _minus_zero_point(bb, a, a_zero_point, channel_axis=-2)
        b_int = _minus_zero_point(bb, b, b_zero_point, channel_axis=-1)
        accumulator = relax.op.matmul(a_int, b_int, out_dtype="int32")
        a_scale, b_scale, y_scale = (_float32(bb, s) for s in (a_scale, b_scale, y_scale))
        if len(a_scale.ty.shape) == 1:
            a_scale = relax.op.expand_dims(a_scale, axis=-1)
        multiplier = relax.op.divide(relax.op.multiply(a_scale, b_scale), y_scale)
        out_dtype = _dtype(bb, y_zero_point) if y_zero_point is not None else "uint8"
        return _requantize(bb, accumulator, multiplier, y_zero_point, out_dtype)

    _impl_v21 = _impl_v10


class LayerNormalization(tvm_onnx.LayerNormalization):
    """TVM returns zeros for the optional Mean and InvStdDev outputs; these are the real ones
    (reduced over the normalized dims, kept as size 1, in float32 by stash_type 1), removed as
    dead code where the graph does not use them."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        output = bb.normalize(super()._impl_v17(bb, inputs, dict(attr), params))[0]
        data = bb.normalize(inputs[0])
        rank = data.ty.ndim
        axes = list(range(attr.get("axis", -1) % rank, rank))
        stash = "float32" if attr.get("stash_type", 1) == 1 else str(data.ty.dtype)
        values = relax.op.astype(data, stash) if str(data.ty.dtype) != stash else data
        mean = bb.emit(relax.op.mean(values, axis=axes, keepdims=True))
        centered = relax.op.subtract(values, mean)
        variance = relax.op.mean(relax.op.multiply(centered, centered), axis=axes, keepdims=True)
        epsilon = relax.const(attr.get("epsilon", 1e-5), stash)
        inv_std_dev = relax.op.rsqrt(relax.op.add(variance, epsilon))
        return relax.Tuple([output, mean, bb.emit(inv_std_dev)])


class CumSum(tvm_onnx.CumSum):
    """A run-time axis (a graph input): the cumulative sum along each dim, chosen by the axis
    value; the shape does not depend on it."""

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        if isinstance(tvm_onnx.get_constant(inputs[1], params), tvm.ir.GenericConst):
            return super()._impl_v14(bb, inputs, attr, params)
        data = bb.normalize(inputs[0])
        rank = data.ty.ndim
        axis = bb.normalize(relax.op.reshape(relax.op.astype(inputs[1], "int64"), []))
        axis = bb.emit(relax.op.where(relax.op.less(axis, relax.const(0, "int64")),
                                      relax.op.add(axis, relax.const(rank, "int64")), axis))
        result = None
        for k in range(rank):
            along_k = super()._impl_v14(bb, [data, relax.const(k, "int64")], attr, params)
            if result is None:
                result = along_k
                continue
            chosen = relax.op.equal(axis, relax.const(k, "int64"))
            result = bb.emit(relax.op.where(chosen, along_k, result))
        return result


class Pow(tvm_onnx.Pow):
    """ONNX lets the exponent's type differ from the base's (float ** int64, int32 ** float),
    and takes integers; the result has the base's type."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        base, exponent = (bb.normalize(i) for i in inputs[:2])
        base_dtype, exponent_dtype = str(base.ty.dtype), str(exponent.ty.dtype)
        if base_dtype == exponent_dtype and "int" in base_dtype:  # TVM's pow is float-only
            power = relax.op.power(relax.op.astype(base, "float64"),
                                   relax.op.astype(exponent, "float64"))
            return relax.op.astype(relax.op.round(power), base_dtype)
        if base_dtype == exponent_dtype:
            return super()._impl_v7(bb, inputs, attr, params)
        if "float" in base_dtype:
            return relax.op.power(base, relax.op.astype(exponent, base_dtype))
        wide = exponent_dtype if "float" in exponent_dtype else "float64"
        power = relax.op.power(relax.op.astype(base, wide), relax.op.astype(exponent, wide))
        return relax.op.astype(relax.op.floor(power), base_dtype)


class LpNormalization(tvm_onnx.OnnxOpConverter):
    """x / ||x||_p along `axis` (p 1 or 2); zero where the norm is zero, as in the reference."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        data = inputs[0]
        axis, p = attr.get("axis", -1), attr.get("p", 2)
        if p == 1:
            norm = relax.op.sum(relax.op.abs(data), axis=[axis], keepdims=True)
        elif p == 2:
            norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(data, data), axis=[axis],
                                              keepdims=True))
        else:
            raise ValueError(f"LpNormalization takes p = 1 or 2, got {p}")
        norm = bb.normalize(norm)
        norm = relax.op.where(relax.op.equal(norm, relax.const(0, str(norm.ty.dtype))),
                              relax.op.ones_like(norm), norm)  # a zero vector stays zero
        return relax.op.divide(data, norm)


class ConvTranspose(tvm_onnx.ConvTranspose):
    """`output_shape` (which TVM ignores) sets the padding, as the ONNX spec derives it:
    total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - out, split with
    the larger half at the end for SAME_UPPER and at the start otherwise; a negative total (an
    output larger than the full one) becomes extra output padding."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "output_shape" not in attr:
            return super()._impl_v1(bb, inputs, attr, params)
        attr = dict(attr)
        wanted = list(attr.pop("output_shape"))
        data, weight = bb.normalize(inputs[0]), bb.normalize(inputs[1])
        spatial = [int(d) for d in data.ty.shape.values[2:]]
        count = len(spatial)
        wanted = wanted[-count:]
        kernel = list(attr.get("kernel_shape", [int(d) for d in weight.ty.shape.values[2:]]))
        strides = list(attr.get("strides", [1] * count))
        dilations = list(attr.get("dilations", [1] * count))
        output_padding = list(attr.get("output_padding", [0] * count))
        auto_pad = attr.pop("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        begin, end = [], []
        for i in range(count):
            total = (strides[i] * (spatial[i] - 1) + output_padding[i]
                     + (kernel[i] - 1) * dilations[i] + 1 - wanted[i])
            if total < 0:
                output_padding[i] -= total
                total = 0
            first = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(first)
            end.append(total - first)
        attr.update(pads=begin + end, output_padding=output_padding)
        return super()._impl_v1(bb, inputs, attr, params)


class NonMaxSuppression(tvm_onnx.NonMaxSuppression):
    """TVM reads max_output_boxes_per_class, iou_threshold and score_threshold only from
    constants and silently uses the defaults (0, 0.5, 0) for anything else; TVM's NMS op takes
    them as tensors, so here they pass as they are, constant or run-time."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (5 - len(inputs))
        boxes, scores = inputs[0], inputs[1]
        defaults = [("int64", 0), ("float32", 0.0), ("float32", 0.0)]
        limits = []
        for value, (dtype, default) in zip(inputs[2:5], defaults):
            known = None if value is None else tvm_onnx.get_constant(value, params)
            if value is None:
                limits.append(relax.const(default, dtype))
            elif isinstance(known, tvm.ir.GenericConst):  # a constant limit sizes the output
                limits.append(relax.const(known.value.numpy().reshape(()).astype(dtype), dtype))
            else:
                value = bb.normalize(relax.op.astype(value, dtype))
                limits.append(relax.op.reshape(value, ()))
        if attr.get("center_point_box", 0):
            boxes = bb.normalize(boxes)
            dtype = str(boxes.ty.dtype)
            parts = bb.emit(relax.op.split(boxes, 4, axis=2))
            centre_x, centre_y, width, height = (bb.emit(relax.TupleGetItem(parts, i))
                                                 for i in range(4))
            half_w = relax.op.divide(width, relax.const(2.0, dtype))
            half_h = relax.op.divide(height, relax.const(2.0, dtype))
            boxes = relax.op.concat([relax.op.subtract(centre_y, half_h),
                                     relax.op.subtract(centre_x, half_w),
                                     relax.op.add(centre_y, half_h),
                                     relax.op.add(centre_x, half_w)], axis=2)
        selected = bb.normalize(relax.op.vision.all_class_non_max_suppression(
            boxes, scores, *limits, output_format="onnx"))
        rows = bb.emit(relax.TupleGetItem(selected, 0))
        if inputs[2] is None or isinstance(tvm_onnx.get_constant(inputs[2], params),
                                           tvm.ir.GenericConst):
            return rows
        return _at_most_per_class(bb, rows, bb.normalize(scores), limits[0])


def _at_most_per_class(bb, rows, scores, limit):
    """The first `limit` rows of each (batch, class) group of NMS's [M, 3] output (TVM's
    kernel applies a run-time max_output_boxes_per_class as if it were the box count). Groups
    come in order, each sorted by score: a row's rank in its group is its index less the
    number of rows of the groups before it."""
    int64 = "int64"
    batch, classes, _ = scores.ty.shape.values
    count = tvm.tirx.Var("nms_rows", int64)  # the op's type says B*C*N rows; it returns fewer
    rows = bb.match_cast(rows, relax.TensorType([count, 3], int64))
    key = relax.op.add(relax.op.multiply(relax.op.take(rows, relax.const(0, int64), axis=1),
                                         dim_tensor(classes)),
                       relax.op.take(rows, relax.const(1, int64), axis=1))  # [M]
    groups = relax.op.arange(0, batch * classes, 1, int64)  # [K]
    before = relax.op.sum(relax.op.astype(relax.op.less(relax.op.expand_dims(key, 0),
                                                        relax.op.expand_dims(groups, 1)),
                                          int64), axis=1)  # [K]: rows in earlier groups
    position = relax.op.arange(0, count, 1, int64)
    rank = relax.op.subtract(position, relax.op.take(before, key, axis=0))
    keep = bb.normalize(relax.op.less(rank, limit))
    order = relax.op.argsort(relax.op.where(keep, position,
                                            relax.op.add(position, dim_tensor(count))),
                             dtype=int64)
    ordered = relax.op.take(rows, order, axis=0)
    kept = relax.op.astype(relax.op.sum(relax.op.astype(keep, int64), axis=0, keepdims=True),
                           int64)
    end = bb.emit(relax.op.add(relax.op.multiply(kept, relax.const(np.array([1, 0]), int64)),
                               relax.const(np.array([0, 3]), int64)))  # [kept, 3]
    trimmed = bb.emit(relax.op.dynamic_strided_slice(
        ordered, relax.const(np.array([0, 0], np.int64), int64), end,
        relax.const(np.array([1, 1], np.int64), int64)))
    return bb.match_cast(trimmed, relax.TensorType([tvm.tirx.Var("selected", int64), 3], int64))


CONVERTERS = {"Range": Range, "ConvTranspose": ConvTranspose,
              "NonMaxSuppression": NonMaxSuppression, "LayerNormalization": LayerNormalization,
              "CumSum": CumSum, "Pow": Pow, "LpNormalization": LpNormalization,
              "ConstantOfShape": ConstantOfShape, "ConvInteger": ConvInteger,
              "QLinearConv": QLinearConv, "QLinearMatMul": QLinearMatMul,
              **onnx_runtime_axes.CONVERTERS, **onnx_recurrent.CONVERTERS,
              **onnx_dft.CONVERTERS, **onnx_runtime_shapes.CONVERTERS,
              **onnx_resize.CONVERTERS, **onnx_signal.CONVERTERS, **onnx_vision.CONVERTERS,
              **onnx_extra_ops.CONVERTERS, **onnx_attention.CONVERTERS,
              **onnx_float8.CONVERTERS, **onnx_losses.CONVERTERS,
              **onnx_recent_ops.CONVERTERS, **onnx_linear_attention.CONVERTERS}
