"""Casts to and from the float8 types, done on the bits.

TVM's own float8 conversions are wrong on CPU: float8_e4m3fn 0 reads back as 0.0078 and NaN as
480, and 1e6 converts to -15. These follow ONNX (onnx.reference's Cast, through ml_dtypes):
round to nearest even, subnormals included; with `saturate` (the default) a value beyond the
type's largest finite one, infinity included, becomes that largest value; without it, it
becomes infinity (e5m2) or NaN (the types that have no infinity). NaN stays NaN. The `fnuz`
types have no negative zero, and their one NaN is 0x80.
"""

from __future__ import annotations

import dataclasses

from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


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


CONVERTERS = {"Cast": Cast, "CastLike": CastLike}
