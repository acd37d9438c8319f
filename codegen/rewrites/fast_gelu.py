"""GELU legalized with TVM's fast erf approximation instead of the exact (slow) erf.

`relax.nn.gelu` is not touched by FastMathTransform; its default legalization calls `erf`,
which costs more than all matmuls of a BERT layer. `topi.fast_erf` agrees with erf to float32
rounding.
"""

from __future__ import annotations

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


FAST_LEGALIZATIONS = {"relax.nn.gelu": _fast_gelu}
