"""GELU, sigmoid and SiLU legalized with TVM's fast erf / exp approximations instead of the exact
(slow, scalar libm) functions.

`relax.nn.gelu` is not touched by FastMathTransform; its default legalization calls `erf`,
which costs more than all matmuls of a BERT layer. `topi.fast_erf` agrees with erf to float32
rounding.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx, topi


def _fast_gelu(bb, call):
    def gelu(x: te.Tensor) -> te.Tensor:
        dtype = x.dtype
        scaled = topi.multiply(x, tirx.const(0.5 ** 0.5, dtype))
        erf = topi.fast_erf(topi.cast(scaled, "float32")) if dtype != "float32" \
            else topi.fast_erf(scaled)
        erf = topi.cast(erf, dtype) if dtype != "float32" else erf
        return topi.multiply(x, topi.add(tirx.const(0.5, dtype),
                                         topi.multiply(erf, tirx.const(0.5, dtype))))

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    """1 / (1 + exp(-x)) with TVM's fast exp."""
    one = tirx.const(1.0, x.dtype)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def _float32_only(op_name: str, compute, name: str):
    """A legalization by `compute` for float32 inputs (fast_exp is float32-only), TVM's own for
    other dtypes."""
    def legalize(bb, call):
        if call.args[0].ty.dtype != "float32":
            return tvm.ir.Op.get(op_name).get_attr("FLegalize")(bb, call)
        return bb.call_te(compute, call.args[0], primfunc_name_hint=name)
    return legalize


FAST_LEGALIZATIONS = {
    "relax.nn.gelu": _fast_gelu,
    "relax.sigmoid": _float32_only("relax.sigmoid", _sigmoid, "sigmoid"),
    # SiLU, the activation of Llama-family MLPs: its default legalization calls the scalar
    # `T.sigmoid` per element, which made the fused gate projection 1.7x slower
    "relax.nn.silu": _float32_only("relax.nn.silu", lambda x: topi.multiply(x, _sigmoid(x)),
                                   "silu"),
}
