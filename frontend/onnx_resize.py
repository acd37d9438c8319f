"""Resize and Upsample computed as the ONNX reference does, with scales, sizes and roi known
while importing or given at run time.

TVM's converter takes only constant scales and sizes, maps coordinates by the ratio of the
input and output lengths (ONNX uses the given scale, which differs when `length * scale` is not
a whole number), and has no antialias, axes or keep_aspect_ratio_policy. Here the resize is
separable, one axis at a time, as in `onnx.reference`: for output position y the source
coordinate x comes from the coordinate transformation; the taps are the integer positions
around x (2 for nearest and linear, 4 for cubic, more when antialiasing a downscale), read with
edge clamping (`take`) and weighted. Nearest reads its one chosen tap, so values pass through
unchanged. The output length and, for an antialiased run-time scale, the tap count are run-time
sizes where they come from run-time values (onnx_runtime_shapes.sizes_of).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import constant_values, dim_tensor, sizes_of

_F64 = "float64"
_SUPPORT = {"linear": 1.0, "cubic": 2.0}  # half-width of the interpolation kernel


def _f64(value) -> relax.Expr:
    return relax.const(float(value), _F64)


def _dim_f64(dim) -> relax.Expr:
    """A shape dim (int or symbolic) as a float64 scalar tensor."""
    if isinstance(dim, (int, tirx.IntImm)):
        return _f64(int(dim))
    return relax.op.astype(dim_tensor(dim), _F64)


def _element(tensor, index: int) -> relax.Expr:
    return relax.op.astype(relax.op.take(tensor, relax.const(index, "int64"), axis=0), _F64)


def _optional(bb, expr, params):
    """None for an omitted input or an empty tensor (ONNX writes both for "not given")."""
    if expr is None:
        return None
    known = constant_values(expr, params)
    if known is not None and known.size == 0:
        return None
    shape = bb.normalize(expr).ty.shape
    if shape is not None and any(isinstance(d, tirx.IntImm) and int(d) == 0 for d in shape.values):
        return None
    return expr


def _static_ints(dims) -> list[int] | None:
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _plan(bb, x, scales, sizes, axes, policy, params):
    """Per resized axis: (axis, float64 scale expr, the scale as a float where known while
    importing, output length as an int or a symbolic size)."""
    dims = list(x.ty.shape.values)
    static = _static_ints([dims[a] for a in axes])
    known = constant_values(sizes if sizes is not None else scales, params)
    if known is not None and static is not None:  # everything known now: numpy, as the reference
        known = np.asarray(known).reshape(-1)
        if sizes is not None:
            factors = [int(s) / length for s, length in zip(known, static)]
            outputs = [int(s) for s in known]
            if policy != "stretch":
                factor = min(factors) if policy == "not_larger" else max(factors)
                factors = [factor] * len(axes)
                outputs = [int(factor * length + 0.5) for length in static]
        else:
            factors = [float(s) for s in known.astype(np.float32)]
            outputs = [int(np.float64(np.float32(s)) * length) for s, length in zip(known, static)]
        return [(a, _f64(f), f, o) for a, f, o in zip(axes, factors, outputs)]
    lengths = [_dim_f64(dims[a]) for a in axes]
    if sizes is not None:
        wanted = [_element(sizes, i) for i in range(len(axes))]
        factors = [relax.op.divide(w, length) for w, length in zip(wanted, lengths)]
        if policy == "stretch":
            outputs = sizes_of(bb, sizes, params, "resize_size")
        else:
            pick = relax.op.minimum if policy == "not_larger" else relax.op.maximum
            factor = factors[0]
            for other in factors[1:]:
                factor = pick(factor, other)
            factors = [factor] * len(axes)
            rounded = [relax.op.floor(relax.op.add(relax.op.multiply(factor, length), _f64(0.5)))
                       for length in lengths]
            outputs = sizes_of(bb, _stack(rounded), params, "resize_size")
    else:
        factors = [_element(scales, i) for i in range(len(axes))]
        scaled = [relax.op.floor(relax.op.multiply(f, length))
                  for f, length in zip(factors, lengths)]
        outputs = sizes_of(bb, _stack(scaled), params, "resize_size")
    return [(a, bb.normalize(f), None, o) for a, f, o in zip(axes, factors, outputs)]


def _stack(scalars) -> relax.Expr:
    return relax.op.astype(relax.op.concat([relax.op.reshape(s, (1,)) for s in scalars]), "int64")


def _source_coordinate(y, scale, length, out_length, coord, roi):
    """x for each output position y (float64 vectors), and the mask of positions that lie
    outside the input (tf_crop_and_resize), or None."""
    width = relax.op.multiply(scale, length)  # scale * input length, not rounded
    one_wide = relax.op.equal(width, _f64(1))
    half = _f64(0.5)
    centre = relax.op.subtract(relax.op.divide(relax.op.add(y, half), scale), half)
    last = relax.op.subtract(length, _f64(1))
    if coord == "align_corners":
        stretched = relax.op.divide(relax.op.multiply(y, last), relax.op.subtract(width, _f64(1)))
        return relax.op.where(one_wide, relax.op.zeros_like(y), stretched), None
    if coord == "asymmetric":
        return relax.op.divide(y, scale), None
    if coord == "half_pixel":
        return centre, None
    if coord == "pytorch_half_pixel":
        return relax.op.where(one_wide, relax.op.full_like(y, _f64(-0.5)), centre), None
    if coord == "tf_half_pixel_for_nn":
        return relax.op.divide(relax.op.add(y, half), scale), None
    if coord == "half_pixel_symmetric":
        adjustment = relax.op.divide(out_length, width)
        offset = relax.op.multiply(relax.op.divide(length, _f64(2)),
                                   relax.op.subtract(_f64(1), adjustment))
        return relax.op.add(offset, centre), None
    if coord == "tf_crop_and_resize":
        start, end = roi
        extent = relax.op.multiply(relax.op.subtract(end, start), last)
        spread = relax.op.divide(relax.op.multiply(y, extent), relax.op.subtract(width, _f64(1)))
        middle = relax.op.full_like(y, relax.op.divide(extent, _f64(2)))
        x = relax.op.add(relax.op.where(one_wide, middle, spread), relax.op.multiply(start, last))
        outside = relax.op.logical_or(relax.op.less(x, _f64(0)), relax.op.greater(x, last))
        return x, outside
    raise NotImplementedError(f"Resize coordinate_transformation_mode {coord!r}")


def _keys_cubic(t, a: float):
    """The cubic convolution kernel at |t| (Keys, coefficient a)."""
    t = relax.op.abs(t)
    t2 = relax.op.multiply(t, t)
    t3 = relax.op.multiply(t2, t)
    near = relax.op.add(relax.op.subtract(relax.op.multiply(t3, _f64(a + 2)),
                                          relax.op.multiply(t2, _f64(a + 3))), _f64(1))
    far = relax.op.add(relax.op.subtract(relax.op.multiply(t3, _f64(a)),
                                         relax.op.multiply(t2, _f64(5 * a))),
                       relax.op.subtract(relax.op.multiply(t, _f64(8 * a)), _f64(4 * a)))
    return relax.op.where(relax.op.less_equal(t, _f64(1)), near,
                          relax.op.where(relax.op.less(t, _f64(2)), far, relax.op.zeros_like(t)))


def _gather(data, indices, axis: int):
    """`data` read along `axis` at the [O, n] `indices`: shape [..., O, n, ...]."""
    out_length, taps = indices.ty.shape.values
    dims = list(data.ty.shape.values)
    picked = relax.op.take(data, relax.op.reshape(indices, (out_length * taps,)), axis=axis)
    return relax.op.reshape(picked, dims[:axis] + [out_length, taps] + dims[axis + 1:])


def _resize_axis(bb, data, axis, scale, scale_value, out_length, options, extrapolation_value,
                 params):
    mode, coord, nearest_mode, cubic_a, exclude_outside, antialias, roi = options
    dims = list(data.ty.shape.values)
    length = _dim_f64(dims[axis])
    y = relax.op.arange(0, out_length, 1, _F64)
    x, outside = _source_coordinate(y, scale, length, _dim_f64(out_length), coord, roi)
    left = bb.normalize(relax.op.subtract(relax.op.ceil(x), _f64(1)))  # the tap left of x
    ratio = bb.normalize(relax.op.subtract(x, left))  # in (0, 1]
    last_index = relax.op.astype(relax.op.subtract(length, _f64(1)), "int64")

    def clamped(position):
        index = relax.op.astype(position, "int64")
        return relax.op.maximum(relax.op.minimum(index, last_index), relax.const(0, "int64"))

    trailing = [1] * (len(dims) - axis - 1)
    if mode == "nearest":
        second = {"round_prefer_floor": relax.op.greater(ratio, _f64(0.5)),
                  "round_prefer_ceil": relax.op.greater_equal(ratio, _f64(0.5)),
                  "floor": relax.op.equal(ratio, _f64(1)),
                  "ceil": relax.op.greater(ratio, _f64(0))}.get(nearest_mode)
        if second is None:
            raise NotImplementedError(f"Resize nearest_mode {nearest_mode!r}")
        chosen = relax.op.where(second, relax.op.add(left, _f64(1)), left)
        result = bb.normalize(relax.op.take(data, clamped(chosen), axis=axis))
    else:
        if mode not in _SUPPORT:
            raise NotImplementedError(f"Resize mode {mode!r}")
        if antialias:
            shrink = (min(scale_value, 1.0) if scale_value is not None
                      else relax.op.minimum(scale, _f64(1)))
            if scale_value is not None:
                taps = 2 - 2 * int(np.floor(-_SUPPORT[mode] / shrink) + 1)
            else:
                first = relax.op.add(relax.op.floor(relax.op.divide(_f64(-_SUPPORT[mode]), shrink)),
                                     _f64(1))
                taps = sizes_of(bb, relax.op.subtract(_f64(2), relax.op.multiply(first, _f64(2))),
                                params, "resize_taps")[0]
        else:
            shrink, taps = 1.0, 2 * int(_SUPPORT[mode])
        first_offset = (_f64(1 - taps // 2) if isinstance(taps, int) else
                        relax.op.subtract(_f64(1), relax.op.divide(_dim_f64(taps), _f64(2))))
        offsets = relax.op.add(relax.op.arange(0, taps, 1, _F64), first_offset)  # [n]
        distance = relax.op.subtract(relax.op.expand_dims(offsets, 0),
                                     relax.op.expand_dims(ratio, 1))  # [O, n]: tap - x
        if isinstance(shrink, relax.Expr):
            distance = relax.op.multiply(distance, shrink)
        elif shrink != 1.0:
            distance = relax.op.multiply(distance, _f64(shrink))
        if mode == "linear":
            weights = relax.op.maximum(relax.op.subtract(_f64(1), relax.op.abs(distance)), _f64(0))
        else:
            weights = _keys_cubic(distance, cubic_a)
        positions = relax.op.add(relax.op.expand_dims(left, 1), relax.op.expand_dims(offsets, 0))
        if exclude_outside:
            inside = relax.op.logical_and(relax.op.greater_equal(positions, _f64(0)),
                                          relax.op.less(positions, length))
            weights = relax.op.where(inside, weights, relax.op.zeros_like(weights))
        if antialias or exclude_outside:
            total = relax.op.sum(weights, axis=1, keepdims=True)
            total = relax.op.where(relax.op.equal(total, _f64(0)), relax.op.ones_like(total), total)
            weights = relax.op.divide(weights, total)
        compute = "float64" if str(data.ty.dtype) == "float64" else "float32"
        values = _gather(bb.normalize(relax.op.astype(data, compute)),
                         bb.normalize(clamped(positions)), axis)
        weights = relax.op.reshape(relax.op.astype(weights, compute),
                                   [out_length, taps] + trailing)
        result = bb.normalize(relax.op.sum(relax.op.multiply(values, weights), axis=axis + 1))
    if outside is not None:
        mask = relax.op.reshape(outside, [out_length] + trailing)
        result = relax.op.where(mask, relax.op.full_like(result, relax.const(extrapolation_value, str(result.ty.dtype))),
                                result)
    return bb.normalize(result)


def resize(bb, x, params, *, scales=None, sizes=None, roi=None, axes=None, mode="nearest",
           coord="half_pixel", nearest_mode="round_prefer_floor", cubic_a=-0.75,
           exclude_outside=False, extrapolation_value=0.0, antialias=False, policy="stretch"):
    x = bb.normalize(x)
    rank = x.ty.ndim
    axes = [a + rank if a < 0 else a for a in (axes if axes is not None else range(rank))]
    if scales is None and sizes is None:
        raise ValueError("Resize needs scales or sizes")
    plan = _plan(bb, x, scales, sizes, axes, policy, params)
    dtype = str(x.ty.dtype)
    result = x
    for position, (axis, scale, scale_value, out_length) in enumerate(plan):
        axis_roi = None
        if coord == "tf_crop_and_resize":
            if roi is None:
                raise ValueError("Resize with tf_crop_and_resize needs roi")
            axis_roi = (_element(roi, position), _element(roi, position + len(axes)))
        elif (scale_value is not None and np.isclose(scale_value, 1.0)
              and _static_ints([result.ty.shape.values[axis]]) == [out_length]):
            continue  # the reference leaves such an axis as it is
        options = (mode, coord, nearest_mode, cubic_a, exclude_outside, antialias, axis_roi)
        result = _resize_axis(bb, result, axis, scale, scale_value, out_length, options,
                              extrapolation_value, params)
    if str(result.ty.dtype) == dtype:
        return result
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        result = relax.op.clip(relax.op.round(result), float(info.min), float(info.max))
    return relax.op.astype(result, dtype)


def _text(attr, name, default):
    value = attr.get(name, default)
    return value.decode("ascii") if isinstance(value, bytes) else value


class Resize(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return resize(bb, inputs[0], params, scales=inputs[1], mode=_text(attr, "mode", "nearest"),
                      coord="asymmetric", nearest_mode="floor")

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        axes = attr.get("axes")
        return resize(
            bb, inputs[0], params,
            roi=_optional(bb, inputs[1], params), scales=_optional(bb, inputs[2], params),
            sizes=_optional(bb, inputs[3], params),
            axes=list(axes) if axes is not None else None,
            mode=_text(attr, "mode", "nearest"),
            coord=_text(attr, "coordinate_transformation_mode", "half_pixel"),
            nearest_mode=_text(attr, "nearest_mode", "round_prefer_floor"),
            cubic_a=float(attr.get("cubic_coeff_a", -0.75)),
            exclude_outside=bool(attr.get("exclude_outside", 0)),
            extrapolation_value=float(attr.get("extrapolation_value", 0.0)),
            antialias=bool(attr.get("antialias", 0)),
            policy=_text(attr, "keep_aspect_ratio_policy", "stretch"))


class Upsample(tvm_onnx.OnnxOpConverter):
    """Resize with the asymmetric coordinate mapping, nearest rounding down (opset 7-9)."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        scales = relax.const(np.asarray(attr["scales"], np.float32))
        return cls._upsample(bb, inputs[0], scales, attr, params)

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        return cls._upsample(bb, inputs[0], inputs[1], attr, params)

    @staticmethod
    def _upsample(bb, x, scales, attr, params):
        mode = _text(attr, "mode", "nearest")
        mode = "linear" if mode in ("bilinear", "trilinear") else mode
        return resize(bb, x, params, scales=scales, mode=mode, coord="asymmetric",
                      nearest_mode="floor")


CONVERTERS = {"Resize": Resize, "Upsample": Upsample}
