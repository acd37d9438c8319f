"""ONNX ops whose output shape is a value the graph computes or takes at run time, and ops
TVM's importer lacks (Det, DeformConv, TfIdfVectorizer, the ai.onnx.ml Binarizer and
ArrayFeatureExtractor, MaxPool's indices output) or gets wrong (IsInf, EyeLike, Trilu).

A window's length, a crop's target shape, a grid's size: when the value is a constant the
converters use it as it is; otherwise it is read at run time (`tensor_to_shape`) and
match_cast into fresh size variables (`sizes_of`), so the output has a symbolic shape and what
follows it compiles as for any other symbolic dim.
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
            dims = list(data.ty.shape.values)
            have = relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([dims[axis]])), ())
            want = relax.op.take(shape, relax.const(position, int64), axis=0)
            difference = bb.normalize(relax.op.subtract(have, want))
            half = relax.op.floor_divide(relax.op.abs(difference), relax.const(2, int64))
            offset = relax.op.where(relax.op.less(difference, relax.const(0, int64)),
                                    relax.op.negative(half), half)
            source = relax.op.add(relax.op.arange(0, length, 1, int64), offset)
            inside = relax.op.logical_and(
                relax.op.greater_equal(source, relax.const(0, int64)), relax.op.less(source, have))
            last = relax.op.subtract(have, relax.const(1, int64))
            clamped = relax.op.maximum(relax.op.minimum(source, last), relax.const(0, int64))
            picked = bb.normalize(relax.op.take(data, clamped, axis=axis))
            mask = relax.op.reshape(inside, [length] + [1] * (rank - axis - 1))
            data = bb.normalize(relax.op.where(mask, picked, relax.op.zeros_like(picked)))
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


def _dim_tensor(dim) -> relax.Expr:
    """A shape dim (int or symbolic) as an int64 scalar tensor."""
    return relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([dim])), ())


def _read_along(bb, data, axis, length, shift, mode="constant", fill=None):
    """`data` read along `axis` at positions j - shift for j < length (shift: int64 scalar
    tensor); positions outside the input read `fill` (constant), the nearest edge (edge), the
    mirror image (reflect) or wrap around (wrap)."""
    int64 = "int64"
    data = bb.normalize(data)
    rank = data.ty.ndim
    have = bb.normalize(_dim_tensor(data.ty.shape.values[axis]))
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
        if inputs[3] is not None:
            known = constant_values(inputs[3], params)
            if known is None:
                raise NotImplementedError("Pad with axes given at run time")
            axes = [int(a) + rank if a < 0 else int(a) for a in known.reshape(-1)]
        pads = bb.normalize(relax.op.astype(inputs[1], "int64"))
        fill = None
        if inputs[2] is not None and mode == "constant":
            fill = relax.op.astype(relax.op.reshape(inputs[2], ()), str(data.ty.dtype))
        int64 = "int64"
        for position, axis in enumerate(axes):
            before = relax.op.take(pads, relax.const(position, int64), axis=0)
            after = relax.op.take(pads, relax.const(position + len(axes), int64), axis=0)
            have = _dim_tensor(data.ty.shape.values[axis])
            (length,) = sizes_of(bb, relax.op.add(relax.op.add(have, before), after), params,
                                 "pad")
            out_dims = list(data.ty.shape.values)
            out_dims[axis] = length
            axis_fill = (None if fill is None else
                         relax.op.broadcast_to(fill, relax.ShapeExpr(out_dims)))
            data = _read_along(bb, data, axis, length, bb.normalize(before), mode, axis_fill)
        return data



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



class AffineGrid(tvm_onnx.OnnxOpConverter):
    """theta [N, 2, 3] (or [N, 3, 4]) applied to the normalized grid of `size` [N, C, H, W]
    (or [N, C, D, H, W]), which may be given at run time: [N, H, W, 2] (or [N, D, H, W, 3])."""

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        theta, size = inputs
        theta = bb.normalize(theta)
        align_corners = bool(attr.get("align_corners", 0))
        spatial = sizes_of(bb, size, params, "affine_grid")[2:]
        dtype = str(theta.ty.dtype)
        coordinates = []  # per spatial dim, positions in [-1, 1]
        for length in spatial:
            steps = relax.op.arange(0, length, 1, "float32")
            count = relax.op.astype(relax.op.reshape(
                relax.op.shape_to_tensor(relax.ShapeExpr([length])), ()), "float32")
            if align_corners:
                step = relax.op.divide(relax.const(2.0, "float32"),
                                       relax.op.subtract(count, relax.const(1.0, "float32")))
                position = relax.op.subtract(relax.op.multiply(steps, step),
                                             relax.const(1.0, "float32"))
            else:
                position = relax.op.subtract(
                    relax.op.divide(relax.op.add(relax.op.multiply(steps, relax.const(
                        2.0, "float32")), relax.const(1.0, "float32")), count),
                    relax.const(1.0, "float32"))
            coordinates.append(position)
        rank = len(spatial)
        grid_shape = relax.ShapeExpr(list(spatial) + [1])
        planes = []
        for dim in reversed(range(rank)):  # x (the last dim) first, then y, then z
            shape = [1] * rank + [1]
            shape[dim] = spatial[dim]
            planes.append(relax.op.broadcast_to(relax.op.reshape(coordinates[dim], shape),
                                                grid_shape))
        planes.append(relax.op.ones(grid_shape, "float32"))
        points = 1
        for length in spatial:
            points = points * length
        grid = relax.op.reshape(relax.op.concat(planes, axis=rank), (points, rank + 1))
        grid = relax.op.astype(grid, dtype)
        moved = relax.op.matmul(grid, relax.op.permute_dims(theta, [0, 2, 1]))  # [N, P, rank]
        batch = theta.ty.shape.values[0]
        return relax.op.reshape(moved, [batch] + list(spatial) + [rank])



class Binarizer(tvm_onnx.OnnxOpConverter):
    """ai.onnx.ml: 1 where x > threshold, else 0, in x's type."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        dtype = str(x.ty.dtype)
        above = relax.op.greater(x, relax.const(attr.get("threshold", 0.0), dtype))
        return relax.op.astype(above, dtype)


class ArrayFeatureExtractor(tvm_onnx.OnnxOpConverter):
    """ai.onnx.ml: the listed columns of the last axis (a 1-D input reads as one row)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        indices = relax.op.reshape(bb.normalize(relax.op.astype(inputs[1], "int64")), (-1,))
        if x.ty.ndim == 1:
            x = bb.normalize(relax.op.expand_dims(x, 0))
        return relax.op.take(x, bb.normalize(indices), axis=x.ty.ndim - 1)



class Det(tvm_onnx.OnnxOpConverter):
    """Determinant of [..., n, n] by Gaussian elimination with partial pivoting, unrolled over
    the static n: each step swaps the largest remaining pivot into place (a swap flips the
    sign), multiplies it into the result and clears the column below it."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        matrix = bb.normalize(inputs[0])
        dtype = str(matrix.ty.dtype)
        size = matrix.ty.shape.values[-1]
        if not isinstance(size, tirx.IntImm):
            raise NotImplementedError("Det of matrices of run-time size")
        size = int(size)
        rank = matrix.ty.ndim
        one, zero = relax.const(1, dtype), relax.const(0, dtype)
        det = None
        for k in range(size):
            column = bb.normalize(relax.op.strided_slice(matrix, [rank - 2, rank - 1], [k, k],
                                                         [size, k + 1]))
            column = relax.op.squeeze(column, [rank - 1])  # [..., n - k]
            pivot_row = relax.op.add(relax.op.argmax(relax.op.abs(column), axis=-1),
                                     relax.const(k, "int64"))  # [...]
            pick = relax.op.astype(relax.op.equal(relax.op.expand_dims(pivot_row, -1), relax.const(
                np.arange(size, dtype=np.int64), "int64")), dtype)  # one-hot, [..., n]
            pivot_values = relax.op.sum(relax.op.multiply(matrix, relax.op.expand_dims(pick, -1)),
                                        axis=-2)  # row pivot_row, [..., n]
            current = relax.op.squeeze(relax.op.strided_slice(matrix, [rank - 2], [k], [k + 1]),
                                       [rank - 2])  # row k, [..., n]
            unit = relax.const(np.eye(size, dtype=dtype)[k])
            swap = relax.op.subtract(pivot_values, current)
            matrix = bb.normalize(relax.op.add(matrix, relax.op.subtract(
                relax.op.multiply(relax.op.expand_dims(unit, -1), relax.op.expand_dims(swap, -2)),
                relax.op.multiply(relax.op.expand_dims(pick, -1), relax.op.expand_dims(swap, -2)))))
            pivot = bb.normalize(relax.op.take(pivot_values, relax.const(k, "int64"), axis=-1))
            swapped = relax.op.not_equal(pivot_row, relax.const(k, "int64"))
            step = relax.op.where(swapped, relax.op.negative(pivot), pivot)
            det = step if det is None else relax.op.multiply(det, step)
            safe = relax.op.where(relax.op.equal(pivot, zero), relax.op.ones_like(pivot), pivot)
            below = relax.const((np.arange(size) > k).astype(dtype))
            column_k = relax.op.take(matrix, relax.const(k, "int64"), axis=rank - 1)  # [..., n]
            factor = relax.op.multiply(relax.op.divide(column_k, relax.op.expand_dims(safe, -1)),
                                       below)
            matrix = bb.normalize(relax.op.subtract(matrix, relax.op.multiply(
                relax.op.expand_dims(factor, -1), relax.op.expand_dims(pivot_values, -2))))
        return det if det is not None else one



class MaxPoolWithIndices(tvm_onnx.OnnxOpConverter):
    """2-D MaxPool with its second output, the flat index of each maximum in the input (row
    major, or column major within a plane for storage_order=1); onnx_fixes gives a MaxPool
    that asks for it this name. Each kernel tap is a gather at constant positions; a later tap
    wins only when strictly larger, so the first maximum is kept, as in the reference."""

    @classmethod
    def _impl_v8(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        if x.ty.ndim != 4:
            raise NotImplementedError("MaxPool's indices output for inputs other than 4-D")
        auto_pad = attr.get("auto_pad", b"NOTSET")
        if attr.get("ceil_mode", 0) or auto_pad not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError("MaxPool's indices output with ceil_mode or auto_pad")
        batch, channels, height, width = x.ty.shape.values
        height, width = int(height), int(width)
        kernel = list(attr["kernel_shape"])
        strides = list(attr.get("strides", [1, 1]))
        dilations = list(attr.get("dilations", [1, 1]))
        pads = list(attr.get("pads", [0, 0, 0, 0]))
        column_major = bool(attr.get("storage_order", 0))
        extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        out_h = (height + pads[0] + pads[2] - extent[0]) // strides[0] + 1
        out_w = (width + pads[1] + pads[3] - extent[1]) // strides[1] + 1
        dtype = str(x.ty.dtype)
        lowest = relax.const(-np.inf if "float" in dtype else np.iinfo(dtype).min, dtype)
        best = index = None
        for a in range(kernel[0]):
            rows = np.arange(out_h) * strides[0] - pads[0] + a * dilations[0]
            for b in range(kernel[1]):
                cols = np.arange(out_w) * strides[1] - pads[1] + b * dilations[1]
                values = relax.op.take(
                    relax.op.take(x, relax.const(np.clip(rows, 0, height - 1), "int64"), axis=2),
                    relax.const(np.clip(cols, 0, width - 1), "int64"), axis=3)
                inside = ((rows >= 0) & (rows < height))[:, None] & \
                    ((cols >= 0) & (cols < width))[None, :]
                values = relax.op.where(relax.const(inside), values, lowest)
                flat = (rows[:, None] + cols[None, :] * height if column_major
                        else rows[:, None] * width + cols[None, :]).astype(np.int64)
                flat = relax.const(flat, "int64")
                if best is None:
                    best = bb.normalize(values)
                    index = bb.normalize(relax.op.broadcast_to(flat, best.ty.shape))
                    continue
                better = bb.normalize(relax.op.greater(values, best))
                best = bb.normalize(relax.op.where(better, values, best))
                index = bb.normalize(relax.op.where(better, flat, index))
        planes = relax.op.add(
            relax.op.multiply(relax.op.expand_dims(relax.op.arange(0, batch, 1, "int64"), 1),
                              _dim_tensor(channels)),
            relax.op.expand_dims(relax.op.arange(0, channels, 1, "int64"), 0))  # [N, C]
        offset = relax.op.multiply(relax.op.reshape(planes, [batch, channels, 1, 1]),
                                   relax.const(height * width, "int64"))
        return relax.Tuple([best, bb.normalize(relax.op.add(index, offset))])



class TfIdfVectorizer(tvm_onnx.OnnxOpConverter):
    """n-gram counts over integer tokens, as the ONNX reference counts them: an n-gram of the
    pool (n within [min_gram_length, max_gram_length]) is counted at every position and every
    skip distance 1..max_skip_count+1 where its tokens appear that far apart; unigrams once.
    Each (size, distance) is one vectorized comparison of the input's windows with the pool's
    n-grams of that size; the counts land on their output columns by a constant 0/1 matrix."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        if attr.get("pool_strings"):
            raise NotImplementedError("TfIdfVectorizer over strings")
        x = bb.normalize(relax.op.astype(inputs[0], "int64"))
        one_row = x.ty.ndim == 1
        if one_row:
            x = bb.normalize(relax.op.expand_dims(x, 0))
        length = x.ty.shape.values[1]
        if not isinstance(length, tirx.IntImm):
            raise NotImplementedError("TfIdfVectorizer over a run-time number of tokens")
        length = int(length)
        pool = np.asarray(attr.get("pool_int64s", []), np.int64)
        starts = list(attr["ngram_counts"]) + [len(pool)]
        columns = np.asarray(attr["ngram_indexes"], np.int64)
        width = int(columns.max()) + 1 if columns.size else 0
        low, high = attr["min_gram_length"], attr["max_gram_length"]
        distances = attr.get("max_skip_count", 0) + 1
        total, first_id = None, 0
        for size, (begin, end) in enumerate(zip(starts[:-1], starts[1:]), start=1):
            grams = pool[begin:end].reshape(-1, size)
            ids = range(first_id, first_id + len(grams))
            first_id += len(grams)
            if not low <= size <= high or not len(grams):
                continue
            counts = None
            for distance in range(1, (1 if size == 1 else distances) + 1):
                positions = length - (size - 1) * distance
                if positions <= 0:
                    continue
                windows = relax.op.concat([relax.op.expand_dims(relax.op.strided_slice(
                    x, [1], [k * distance], [k * distance + positions]), 2)
                    for k in range(size)], axis=2)  # [B, L, n]
                same = relax.op.equal(relax.op.expand_dims(windows, 2),
                                      relax.const(grams[None, None], "int64"))  # [B, L, P, n]
                found = relax.op.min(relax.op.astype(same, "float32"), axis=3)
                here = relax.op.sum(found, axis=1)  # [B, P]
                counts = here if counts is None else relax.op.add(counts, here)
            if counts is None:
                continue
            spread = np.zeros((len(grams), width), np.float32)
            spread[np.arange(len(grams)), columns[list(ids)]] = 1.0
            placed = relax.op.matmul(counts, relax.const(spread))
            total = placed if total is None else relax.op.add(total, placed)
        batch = x.ty.shape.values[0]
        if total is None:
            total = relax.op.zeros(relax.ShapeExpr([batch, width]), "float32")
        weights = attr.get("weights")
        mode = attr.get("mode", b"TF")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "IDF":
            present = relax.op.astype(relax.op.greater(total, relax.const(0.0)), "float32")
            total = (relax.op.multiply(present, relax.const(np.asarray(weights, np.float32)))
                     if weights else present)
        elif mode == "TFIDF" and weights:
            total = relax.op.multiply(total, relax.const(np.asarray(weights, np.float32)))
        return relax.op.squeeze(total, [0]) if one_row else total



class Col2Im(tvm_onnx.OnnxOpConverter):
    """Blocks [N, C * prod(block), L] summed back into images [N, C, *image_shape], the image and
    block shapes constant or given at run time: every input element's target position is
    computed (its channel, block offset and block index decomposed row-major, then stride,
    padding and dilation applied) and the elements are scatter-added there; those that land in
    the padding go to one extra slot, dropped at the end."""

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        data, image_shape, block_shape = inputs
        data = bb.normalize(data)
        batch, merged, blocks = data.ty.shape.values
        image = sizes_of(bb, image_shape, params, "col2im_image")
        count = len(image)
        strides = list(attr.get("strides", [1] * count))
        dilations = list(attr.get("dilations", [1] * count))
        pads = list(attr.get("pads", [0] * (2 * count)))
        int64 = "int64"

        def ints(value):
            return relax.const(value, int64)

        image_shape = bb.normalize(relax.op.astype(image_shape, int64))
        block_shape = bb.normalize(relax.op.astype(block_shape, int64))
        image_t = [relax.op.take(image_shape, ints(d), axis=0) for d in range(count)]
        block_t = [relax.op.take(block_shape, ints(d), axis=0) for d in range(count)]
        per_channel = block_t[0]
        for b in block_t[1:]:
            per_channel = relax.op.multiply(per_channel, b)
        (channels,) = sizes_of(bb, relax.op.floor_divide(_dim_tensor(merged), per_channel),
                               params, "col2im_channels")
        grid = [batch, merged, blocks]
        n, ci, cell = (relax.op.reshape(relax.op.arange(0, grid[a], 1, int64),
                                        [grid[a] if b == a else 1 for b in range(3)])
                       for a in range(3))
        channel = relax.op.floor_divide(ci, per_channel)
        offset, along = relax.op.floor_mod(ci, per_channel), [None] * count
        counts = []
        for d in range(count):
            extent = relax.op.add(relax.op.multiply(relax.op.subtract(block_t[d], ints(1)),
                                                    ints(dilations[d])), ints(1))
            room = relax.op.add(image_t[d], ints(pads[d] + pads[count + d]))
            counts.append(relax.op.add(relax.op.floor_divide(
                relax.op.subtract(room, extent), ints(strides[d])), ints(1)))
        block_index = [None] * count
        for d in reversed(range(count)):  # row-major: the last dim varies fastest
            along[d] = relax.op.floor_mod(offset, block_t[d])
            offset = relax.op.floor_divide(offset, block_t[d])
            block_index[d] = relax.op.floor_mod(cell, counts[d])
            cell = relax.op.floor_divide(cell, counts[d])
        target, inside = relax.op.add(relax.op.multiply(n, _dim_tensor(channels)), channel), None
        for d in range(count):
            position = relax.op.add(relax.op.subtract(
                relax.op.multiply(block_index[d], ints(strides[d])), ints(pads[d])),
                relax.op.multiply(along[d], ints(dilations[d])))
            fits = relax.op.logical_and(relax.op.greater_equal(position, ints(0)),
                                        relax.op.less(position, image_t[d]))
            inside = fits if inside is None else relax.op.logical_and(inside, fits)
            target = relax.op.add(relax.op.multiply(target, image_t[d]), position)
        total = batch * channels
        for length in image:
            total = total * length
        target = relax.op.where(inside, target, _dim_tensor(total))
        target = relax.op.reshape(bb.normalize(relax.op.broadcast_to(target, data.ty.shape)),
                                  (batch * merged * blocks,))
        summed = relax.op.scatter_elements(
            relax.op.zeros(relax.ShapeExpr([total + 1]), str(data.ty.dtype)),
            bb.normalize(target), relax.op.reshape(data, (batch * merged * blocks,)),
            axis=0, reduction="add")
        kept = bb.normalize(relax.op.strided_slice(summed, [0], [0], [total]))
        return relax.op.reshape(kept, [batch, channels, *image])



class DeformConv(tvm_onnx.OnnxOpConverter):
    """2-D deformable convolution: each kernel tap samples the input bilinearly (zero outside)
    at its position moved by the offset input (per offset group), weighted by the optional
    mask; the samples are then one grouped matmul with the weights."""

    @classmethod
    def _impl_v19(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (5 - len(inputs))
        x, weight, offset, bias, mask = (bb.normalize(v) if v is not None else None
                                         for v in inputs)
        if x.ty.ndim != 4:
            raise NotImplementedError("DeformConv other than 2-D")
        batch, channels, height, width = (int(d) for d in x.ty.shape.values)
        out_channels, _, kh, kw = (int(d) for d in weight.ty.shape.values)
        out_h, out_w = (int(d) for d in offset.ty.shape.values[2:])
        group, offset_group = attr.get("group", 1), attr.get("offset_group", 1)
        strides = list(attr.get("strides", [1, 1]))
        dilations = list(attr.get("dilations", [1, 1]))
        pads = list(attr.get("pads", [0, 0, 0, 0]))
        dtype = str(x.ty.dtype)
        taps, points = kh * kw, out_h * out_w
        rows = (np.arange(out_h)[None, :, None] * strides[0] - pads[0]
                + (np.arange(kh) * dilations[0]).repeat(kw)[:, None, None])
        cols = (np.arange(out_w)[None, None, :] * strides[1] - pads[1]
                + np.tile(np.arange(kw) * dilations[1], kh)[:, None, None])
        base_y = np.broadcast_to(rows, (taps, out_h, out_w)).reshape(taps, points)
        base_x = np.broadcast_to(cols, (taps, out_h, out_w)).reshape(taps, points)
        moved = relax.op.reshape(offset, (batch, offset_group, taps, 2, points))
        y = bb.normalize(relax.op.add(relax.const(base_y.astype(dtype)),
                                      relax.op.squeeze(relax.op.strided_slice(
                                          moved, [3], [0], [1]), [3])))  # [N, G, T, P]
        x_pos = bb.normalize(relax.op.add(relax.op.squeeze(relax.op.strided_slice(
            moved, [3], [1], [2]), [3]), relax.const(base_x.astype(dtype))))
        scale = (relax.op.reshape(mask, (batch, offset_group, taps, points)) if mask is not None
                 else None)
        top, left = bb.normalize(relax.op.floor(y)), bb.normalize(relax.op.floor(x_pos))
        down, right = relax.op.subtract(y, top), relax.op.subtract(x_pos, left)
        one = relax.const(1.0, dtype)
        per_group = channels // offset_group
        flat = relax.op.reshape(x, (batch, offset_group, per_group, height * width))
        sampled = None
        for dy, wy in ((0, relax.op.subtract(one, down)), (1, down)):
            for dx, wx in ((0, relax.op.subtract(one, right)), (1, right)):
                row = relax.op.add(top, relax.const(float(dy), dtype))
                col = relax.op.add(left, relax.const(float(dx), dtype))
                inside = relax.op.logical_and(
                    relax.op.logical_and(relax.op.greater_equal(row, relax.const(0.0, dtype)),
                                         relax.op.less(row, relax.const(float(height), dtype))),
                    relax.op.logical_and(relax.op.greater_equal(col, relax.const(0.0, dtype)),
                                         relax.op.less(col, relax.const(float(width), dtype))))
                share = relax.op.multiply(relax.op.multiply(wy, wx),
                                          relax.op.astype(inside, dtype))
                if scale is not None:
                    share = relax.op.multiply(share, scale)
                row = relax.op.clip(relax.op.astype(row, "int64"), 0, height - 1)
                col = relax.op.clip(relax.op.astype(col, "int64"), 0, width - 1)
                index = relax.op.add(relax.op.multiply(row, relax.const(width, "int64")), col)
                index = relax.op.broadcast_to(
                    relax.op.reshape(index, (batch, offset_group, 1, taps * points)),
                    (batch, offset_group, per_group, taps * points))
                values = relax.op.gather_elements(flat, index, axis=3)
                term = relax.op.multiply(values, relax.op.reshape(
                    share, (batch, offset_group, 1, taps * points)))
                sampled = term if sampled is None else relax.op.add(sampled, term)
        reduce = channels // group * taps
        columns = relax.op.reshape(sampled, (batch, group, reduce, points))
        kernel = relax.op.reshape(weight, (1, group, out_channels // group, reduce))
        result = relax.op.reshape(relax.op.matmul(kernel, columns),
                                  (batch, out_channels, out_h, out_w))
        if bias is not None:
            result = relax.op.add(result, relax.op.reshape(bias, (1, out_channels, 1, 1)))
        return result



class STFT(tvm_onnx.OnnxOpConverter):
    """Short-time Fourier transform: frames of frame_length every frame_step samples (both may
    be given at run time; a window fixes the length), windowed, each multiplied by the DFT
    matrix (angles reduced modulo the length in integers, so they stay accurate)."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        signal, step, window, frame_length = inputs
        signal = bb.normalize(signal)
        batch, samples, parts = signal.ty.shape.values
        int64 = "int64"
        if window is not None:
            window = bb.normalize(window)
            length = window.ty.shape.values[0]
        elif frame_length is not None:
            (length,) = sizes_of(bb, frame_length, params, "stft_length")
        else:
            length = samples
        step = bb.normalize(relax.op.astype(relax.op.reshape(step, ()), int64))
        length_t = _dim_tensor(length)
        (frames,) = sizes_of(bb, relax.op.add(relax.op.floor_divide(
            relax.op.subtract(_dim_tensor(samples), length_t), step), relax.const(1, int64)),
            params, "stft_frames")
        onesided = bool(attr.get("onesided", 1))
        if onesided and isinstance(length, (int, tirx.IntImm)):
            bins = int(length) // 2 + 1
        elif onesided:
            (bins,) = sizes_of(bb, relax.op.add(relax.op.floor_divide(
                length_t, relax.const(2, int64)), relax.const(1, int64)), params, "stft_bins")
        else:
            bins = length
        starts = relax.op.multiply(relax.op.arange(0, frames, 1, int64), step)
        index = relax.op.add(relax.op.expand_dims(starts, 1),
                             relax.op.expand_dims(relax.op.arange(0, length, 1, int64), 0))
        framed = relax.op.take(signal, bb.normalize(index), axis=1)  # [N, frames, length, 2|1]
        dtype = str(signal.ty.dtype)
        real = relax.op.take(framed, relax.const(0, int64), axis=3)
        imag = (relax.op.take(framed, relax.const(1, int64), axis=3)
                if isinstance(parts, tirx.IntImm) and int(parts) == 2 else None)
        if window is not None:
            real = relax.op.multiply(real, window)
            imag = relax.op.multiply(imag, window) if imag is not None else None
        product = relax.op.floor_mod(relax.op.multiply(
            relax.op.expand_dims(relax.op.arange(0, length, 1, int64), 1),
            relax.op.expand_dims(relax.op.arange(0, bins, 1, int64), 0)), length_t)
        angle = relax.op.divide(relax.op.multiply(relax.op.astype(product, "float64"),
                                                  relax.const(2 * math.pi, "float64")),
                                relax.op.astype(length_t, "float64"))  # [length, bins]
        cos = bb.normalize(relax.op.astype(relax.op.cos(angle), dtype))
        sin = bb.normalize(relax.op.astype(relax.op.sin(angle), dtype))
        out_real = relax.op.matmul(real, cos)
        out_imag = relax.op.negative(relax.op.matmul(real, sin))
        if imag is not None:
            out_real = relax.op.add(out_real, relax.op.matmul(imag, sin))
            out_imag = relax.op.add(out_imag, relax.op.matmul(imag, cos))
        return relax.op.stack([out_real, out_imag], axis=3)



class MelWeightMatrix(tvm_onnx.OnnxOpConverter):
    """Triangular mel filters [dft_length // 2 + 1, num_mel_bins], as the ONNX reference lays
    them out: filter i rises from bin f(i) to f(i + 1) and falls to f(i + 2), f the mel-spaced
    edges rounded down to DFT bins; all five inputs may be given at run time."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        mels_in, dft_in, rate_in, low_in, high_in = inputs
        f64, int64 = "float64", "int64"

        def scalar(value, dtype):
            return bb.normalize(relax.op.astype(relax.op.reshape(value, ()), dtype))

        dft, rate = scalar(dft_in, f64), scalar(rate_in, f64)
        (mels,) = sizes_of(bb, mels_in, params, "mel_bins")
        (spectrum,) = sizes_of(bb, relax.op.add(relax.op.floor_divide(
            scalar(dft_in, int64), relax.const(2, int64)), relax.const(1, int64)), params,
            "mel_spectrum")

        def to_mel(hertz):
            return relax.op.divide(relax.op.multiply(relax.const(2595.0, f64), relax.op.log(
                relax.op.add(relax.const(1.0, f64), relax.op.divide(hertz, relax.const(700.0, f64))))),
                relax.const(math.log(10), f64))

        low, high = to_mel(scalar(low_in, f64)), to_mel(scalar(high_in, f64))
        step = relax.op.divide(relax.op.subtract(high, low),
                               relax.op.add(scalar(mels_in, f64), relax.const(2.0, f64)))

        def edge(shift):  # f(i + shift) for each filter i: [1, M]
            k = relax.op.add(relax.op.arange(0, mels, 1, f64), relax.const(float(shift), f64))
            mel = relax.op.add(relax.op.multiply(k, step), low)
            hertz = relax.op.multiply(relax.const(700.0, f64), relax.op.subtract(relax.op.exp(
                relax.op.multiply(relax.op.divide(mel, relax.const(2595.0, f64)),
                                  relax.const(math.log(10), f64))), relax.const(1.0, f64)))
            bin_ = relax.op.floor(relax.op.divide(relax.op.multiply(
                relax.op.add(dft, relax.const(1.0, f64)), hertz), rate))
            return relax.op.expand_dims(bb.normalize(bin_), 0)

        left, centre, right = edge(0), edge(1), edge(2)
        j = relax.op.expand_dims(relax.op.arange(0, spectrum, 1, f64), 1)  # [J, 1]
        one = relax.const(1.0, f64)
        rise_width = relax.op.subtract(centre, left)
        rising = relax.op.where(
            relax.op.equal(rise_width, relax.const(0.0, f64)),
            relax.op.astype(relax.op.equal(j, centre), f64),
            relax.op.where(relax.op.logical_and(relax.op.greater_equal(j, left),
                                                relax.op.less_equal(j, centre)),
                           relax.op.divide(relax.op.subtract(j, left),
                                           relax.op.maximum(rise_width, one)),
                           relax.const(0.0, f64)))
        fall_width = relax.op.subtract(right, centre)
        falling = relax.op.logical_and(relax.op.logical_and(
            relax.op.greater_equal(j, centre), relax.op.less(j, right)),
            relax.op.greater(fall_width, relax.const(0.0, f64)))
        weights = relax.op.where(falling, relax.op.divide(relax.op.subtract(right, j),
                                                          relax.op.maximum(fall_width, one)),
                                 rising)
        return relax.op.astype(weights, tvm_onnx.get_type(attr.get("output_datatype", 1)))


CONVERTERS = {"HannWindow": HannWindow, "HammingWindow": HammingWindow,
              "BlackmanWindow": BlackmanWindow, "Expand": Expand,
              "CenterCropPad": CenterCropPad, "IsInf": IsInf, "EyeLike": EyeLike, "Trilu": Trilu,
              "Pad": Pad, "ShapeAsTensor": ShapeAsTensor,
              "AffineGrid": AffineGrid, "ai.onnx.ml.Binarizer": Binarizer,
              "ai.onnx.ml.ArrayFeatureExtractor": ArrayFeatureExtractor, "Det": Det,
              "MaxPoolWithIndices": MaxPoolWithIndices, "TfIdfVectorizer": TfIdfVectorizer,
              "Col2Im": Col2Im, "DeformConv": DeformConv,
              "STFT": STFT, "MelWeightMatrix": MelWeightMatrix}
