"""FuseDequantizeGEMV: a decode step's matrix-vector product reads its packed weight directly.

    w = call_tir(dequantize_int4, (q, scale, offset))       y = call_tir(fused, (x, q, scale,
    y = call_tir(fused_matmul_add, (x, w, bias))      ->                        offset, bias))

where x has one row. The GEMV rule then expands the weight in registers as it streams it
(see `codegen/cpu/gemv.py`): the bytes read per step are the packed ones. With more rows the
expanded weight is reused by every row, so it stays a kernel of its own, written once per call.
Runs after FuseOps/FuseTIR, so the matmul's epilogue is already in its kernel.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

DEQUANTIZE_ATTR = "graft.dequantize"  # set on the expansion kernels by passes/quantize
MOST_OPERANDS = 6  # operands of the fused matmul after x and the weight (bias, residual, ...)


def one_row(x) -> bool:
    """Whether x is statically one row: every dim but the last is 1."""
    shape = getattr(x.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return False
    return all(isinstance(d, tvm.tirx.IntImm) and d.value == 1 for d in shape.values[:-1])


def has_dequantize_kernels(mod: tvm.IRModule) -> bool:
    return any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and DEQUANTIZE_ATTR in f.attrs for _, f in mod.functions_items())


def _patterns() -> list:
    patterns = []
    for packed_arrays in (1, 2, 3):
        dequantize = is_op("relax.call_tir")(
            GlobalVarPattern(), TuplePattern([wildcard() for _ in range(packed_arrays)]))
        for extra in range(MOST_OPERANDS + 1):
            matmul = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(
                [wildcard(), dequantize, *[wildcard() for _ in range(extra)]]))
            patterns.append((f"dequantize_gemv_{packed_arrays}_{extra}", matmul, dequantize))
    return patterns


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeGEMV")
class FuseDequantizeGEMV:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not has_dequantize_kernels(mod):
            return mod

        def is_gemv(context) -> bool:
            call = context.matched_expr
            callee = mod[context.annotated_expr["dequantize"].args[0]]
            if not (callee.attrs is not None and DEQUANTIZE_ATTR in callee.attrs):
                return False
            return one_row(call.args[1].fields[0])

        patterns = [(name, pattern, {"dequantize": dq}, is_gemv)
                    for name, pattern, dq in _patterns()]
        fused = relax.transform.FuseOpsByPattern(patterns, bind_constants=False,
                                                 annotate_codegen=False)(mod)
        return relax.transform.FuseTIR()(fused)
