"""Casts to and from the float8 types, done on the bits; QuantizeLinear and DequantizeLinear
of float8 values and of blocked scales (TVM's converters take neither).

TVM's own float8 conversions are wrong on CPU: float8_e4m3fn 0 reads back as 0.0078 and NaN as
480, and 1e6 converts to -15. These follow ONNX (onnx.reference's Cast, through ml_dtypes):
round to nearest even, subnormals included; with `saturate` (the default) a value beyond the
type's largest finite one, infinity included, becomes that largest value; without it, it
becomes infinity (e5m2) or NaN (the types that have no infinity). NaN stays NaN. The `fnuz`
types have no negative zero, and their one NaN is 0x80.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import optional_input


@dataclasses.dataclass(frozen=True)
class Float8:
    exponent_bits: int
    mantissa_bits: int
    bias: int
    largest: int  # bit pattern of the largest finite value, sign bit clear
    overflow: int  # what an out-of-range value becomes without saturation (sign added, but fnuz)
    nan: int
    unsigned_zero: bool  # fnuz: no negative zero, and 0x80 is NaN


FLOAT8 = {
    "float8_e4m3fn": Float8(4, 3, 7, 0x7E, 0x7F, 0x7F, False),
    "float8_e4m3fnuz": Float8(4, 3, 8, 0x7F, 0x80, 0x80, True),
    "float8_e5m2": Float8(5, 2, 15, 0x7B, 0x7C, 0x7E, False),
    "float8_e5m2fnuz": Float8(5, 2, 16, 0x7F, 0x80, 0x80, True),
}


def _u32(value):
    return tirx.const(value, "uint32")


def _power_of_two(exponent):
    """2**exponent as a float32, for an int32 exponent in the normal range."""
    return tirx.reinterpret("float32", tirx.Cast("uint32", exponent + 127) << _u32(23))


def _encode(value, fmt: Float8, saturate: bool):
    """float32 -> the float8 bit pattern (uint8)."""
    bits = tirx.reinterpret("uint32", value)
    sign = bits >> _u32(31)
    magnitude_bits = bits & _u32(0x7FFFFFFF)
    magnitude = tirx.reinterpret("float32", magnitude_bits)
    largest = _decode_magnitude(tirx.const(fmt.largest, "uint32"), fmt)
    if saturate:
        magnitude = tirx.Min(magnitude, largest)
        magnitude_bits = tirx.reinterpret("uint32", magnitude)
    shift = 23 - fmt.mantissa_bits
    # normal: round the float32 mantissa to the target's, carrying into the exponent
    rounded = (magnitude_bits + _u32((1 << (shift - 1)) - 1)
               + ((magnitude_bits >> _u32(shift)) & _u32(1))) >> _u32(shift)
    normal = rounded - _u32((127 - fmt.bias) << fmt.mantissa_bits)
    # subnormal: a multiple of the smallest subnormal, rounded half to even
    smallest_normal = _power_of_two(tirx.const(1 - fmt.bias, "int32"))
    steps = magnitude * _power_of_two(tirx.const(fmt.bias - 1 + fmt.mantissa_bits, "int32"))
    subnormal = tirx.Cast("uint32", tirx.nearbyint(steps))
    code = tirx.Select(magnitude < smallest_normal, subnormal, normal)
    code = tirx.Select(code > _u32(fmt.largest), _u32(fmt.overflow), code)
    is_nan = tirx.isnan(value)
    if fmt.unsigned_zero:
        signed = tirx.Select(tirx.any(code == _u32(0), code == _u32(fmt.overflow)), code,
                             code | (sign << _u32(7)))
        code = tirx.Select(is_nan, _u32(fmt.nan), signed)
    else:
        code = tirx.Select(is_nan, _u32(fmt.nan), code) | (sign << _u32(7))
    return tirx.Cast("uint8", code)


def _decode_magnitude(code, fmt: Float8):
    """The value of a float8 bit pattern without its sign (uint32 `code` < 0x80), as float32."""
    mantissa_mask = (1 << fmt.mantissa_bits) - 1
    exponent = tirx.Cast("int32", code >> _u32(fmt.mantissa_bits))
    mantissa = tirx.Cast("int32", code & _u32(mantissa_mask))
    significand = tirx.Select(exponent == 0, mantissa, mantissa + (1 << fmt.mantissa_bits))
    scale = _power_of_two(tirx.Max(exponent, 1) - (fmt.bias + fmt.mantissa_bits))
    return tirx.Cast("float32", significand) * scale


def _decode(bits, fmt: Float8):
    """A float8 bit pattern (uint8) -> float32."""
    code = tirx.Cast("uint32", bits)
    magnitude = _decode_magnitude(code & _u32(0x7F), fmt)
    value = tirx.Select((code >> _u32(7)) == _u32(1), -magnitude, magnitude)
    nan = tirx.const(float("nan"), "float32")
    if fmt.unsigned_zero:
        return tirx.Select(code == _u32(0x80), nan, value)
    if fmt.exponent_bits == 5:  # IEEE-like: all-ones exponent is infinity or NaN
        special = (code & _u32(0x7C)) == _u32(0x7C)
        infinity = tirx.Select((code >> _u32(7)) == _u32(1), tirx.const(float("-inf"), "float32"),
                               tirx.const(float("inf"), "float32"))
        return tirx.Select(special, tirx.Select((code & _u32(3)) == _u32(0), infinity, nan),
                           value)
    return tirx.Select((code & _u32(0x7F)) == _u32(0x7F), nan, value)


def cast(bb, x, target: str, saturate: bool = True):
    """`x` cast to `target`, through float32 where either side is a float8 type."""
    x = bb.normalize(x)
    source = str(x.ty.dtype)
    if source == target:
        return x
    if source in FLOAT8:
        fmt = FLOAT8[source]
        x = bb.emit_te(lambda t: te.compute(t.shape, lambda *i: _decode(
            tirx.reinterpret("uint8", t(*i)), fmt), name="from_float8"), x,
            primfunc_name_hint="from_" + source)
        return cast(bb, x, target, saturate)
    if target in FLOAT8:
        fmt = FLOAT8[target]
        if source != "float32":
            x = bb.normalize(relax.op.astype(x, "float32"))
        return bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tirx.reinterpret(
            target, _encode(t(*i), fmt, saturate)), name="to_float8"), x,
            primfunc_name_hint="to_" + target)
    return relax.op.astype(x, target)


def _involves_float8(bb, x, target):
    return target in FLOAT8 or str(bb.normalize(x).ty.dtype) in FLOAT8


class Cast(tvm_onnx.Cast):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        target = str(tvm_onnx.get_type(attr["to"]))
        if not _involves_float8(bb, inputs[0], target):
            return super()._impl_v13(bb, inputs, attr, params)
        return cast(bb, inputs[0], target, bool(attr.get("saturate", 1)))


class CastLike(tvm_onnx.CastLike):
    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        target = str(bb.normalize(inputs[1]).ty.dtype)
        if not _involves_float8(bb, inputs[0], target):
            return super()._impl_v15(bb, inputs, attr, params)
        return cast(bb, inputs[0], target, bool(attr.get("saturate", 1)))


def _laid_out(bb, value, like, axis, block_size):
    """A scale or zero point shaped to broadcast against `like`: a scalar as it is, a [C]
    vector along `axis`, a blocked one (`block_size` > 0) repeated along `axis`."""
    value = bb.normalize(value)
    like = bb.normalize(like)
    rank = like.ty.ndim
    axis = axis % max(rank, 1)
    if value.ty.ndim == 0:
        return value
    if block_size:
        repeated = relax.op.repeat(value, block_size, axis=axis)
        return bb.normalize(relax.op.strided_slice(repeated, [axis], [0],
                                                   [like.ty.shape.values[axis]]))
    if value.ty.ndim == 1 and rank > 1:
        return relax.op.reshape(value, [-1] + [1] * (rank - 1 - axis)) if axis < rank - 1 \
            else value
    return value


def _as_float32(bb, x):
    return cast(bb, x, "float32")


class _ConvertedFromOpset19:
    """Opsets 19, 21 and 23 through the class's `_convert`, which falls back to TVM's
    converter of that version (the next class in the MRO) for the cases it leaves to it."""

    @classmethod
    def _impl_v19(cls, bb, inputs, attr, params):
        return cls._convert(super()._impl_v19, bb, inputs, attr, params)

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        return cls._convert(super()._impl_v21, bb, inputs, attr, params)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        return cls._convert(super()._impl_v23, bb, inputs, attr, params)


class QuantizeLinear(_ConvertedFromOpset19, tvm_onnx.QuantizeLinear):
    """float8 outputs (`saturate` as in Cast; ONNX applies no zero point to them) and blocked
    scales, computed as the ONNX reference does: round half to even of x / scale, plus the zero
    point, saturated to the integer type. Other cases stay with TVM's converter."""

    @classmethod
    def _target(cls, bb, inputs, attr):
        zero_point = optional_input(inputs, 2)
        if zero_point is not None:
            return str(bb.normalize(zero_point).ty.dtype)
        output_dtype = attr.get("output_dtype", 0)
        return str(tvm_onnx.get_type(output_dtype)) if output_dtype else "uint8"

    @classmethod
    def _convert(cls, tvm_impl, bb, inputs, attr, params):
        target = cls._target(bb, inputs, attr)
        block_size = attr.get("block_size", 0)
        if target not in FLOAT8 and not block_size:
            return tvm_impl(bb, inputs, attr, params)
        x = bb.normalize(inputs[0])
        axis = attr.get("axis", 1)
        scale = _as_float32(bb, _laid_out(bb, inputs[1], x, axis, block_size))
        scaled = relax.op.divide(_as_float32(bb, x), scale)
        if target in FLOAT8:
            return cast(bb, scaled, target, bool(attr.get("saturate", 1)))
        rounded = relax.op.round(scaled)
        if optional_input(inputs, 2) is not None:
            zero_point = _as_float32(bb, _laid_out(bb, inputs[2], x, axis, block_size))
            rounded = relax.op.add(rounded, zero_point)
        info = np.iinfo(target)
        return relax.op.astype(relax.op.clip(rounded, int(info.min), int(info.max)), target)


class DequantizeLinear(_ConvertedFromOpset19, tvm_onnx.DequantizeLinear):
    """float8 inputs and blocked scales: (x - zero_point) * scale, in float32, as the
    reference computes it, then in the scale's type (or `output_dtype`)."""

    @classmethod
    def _convert(cls, tvm_impl, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        block_size = attr.get("block_size", 0)
        if str(x.ty.dtype) not in FLOAT8 and not block_size:
            return tvm_impl(bb, inputs, attr, params)
        axis = attr.get("axis", 1)
        scale = bb.normalize(inputs[1])
        output_dtype = attr.get("output_dtype", 0)
        out_dtype = str(tvm_onnx.get_type(output_dtype)) if output_dtype else str(scale.ty.dtype)
        value = _as_float32(bb, x)
        zero_point = optional_input(inputs, 2)
        if zero_point is not None and str(x.ty.dtype) not in FLOAT8:
            value = relax.op.subtract(value, _as_float32(bb, _laid_out(bb, zero_point, x, axis,
                                                                      block_size)))
        scale = _as_float32(bb, _laid_out(bb, scale, x, axis, block_size))
        return cast(bb, relax.op.multiply(value, scale), out_dtype)


CONVERTERS = {"Cast": Cast, "CastLike": CastLike, "QuantizeLinear": QuantizeLinear,
              "DequantizeLinear": DequantizeLinear}
