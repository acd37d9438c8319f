"""QuantizedGEMVKernel: a one-row product with an int4 weight becomes graft's grouped kernel.

    w = call_tir(dequantize_int4, (q, scale, offset))
    y = call_tir(matmul, (x, w))                         ->   y = call_tir(gemv_int4, (x, q,
                                                                             scale, offset))

where x has one row (a decode step). The kernel applies each group's scale once per partial
sum instead of once per weight (see `passes/quantize/formats.gemv_func`); it is marked
OutEWiseFusable, so FuseOps then fuses the epilogue (bias, SiLU gate, residual add) into it.
Runs after legalization, before FuseOps. Other products keep dequantize + matmul.
"""

from __future__ import annotations

import tvm
from tvm import relax

from graft.codegen.rewrites import mutate_relax_functions
from graft.codegen.rewrites.fuse_dequantize import DEQUANTIZE_ATTR, has_dequantize_kernels, one_row
from graft.passes.quantize.formats import PackedWeight, gemv_func

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@relax.expr_functor.mutator
class _GroupedGEMV(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.kernels: dict = {}

    def packed_layout(self, expr):
        """The int4 layout of a weight bound to a dequantize kernel's call, else None."""
        if not isinstance(expr, relax.Var):
            return None
        value = self.lookup_binding(expr)
        if not (isinstance(value, relax.Call) and value.op.same_as(CALL_TIR)):
            return None
        if value.args[0] not in self.mod.get_global_vars():
            return None  # a kernel this pass added
        callee = self.mod[value.args[0]]
        text = callee.attrs.get(DEQUANTIZE_ATTR) if callee.attrs is not None else None
        if text is None or not str(text).startswith("int4/"):
            return None
        return PackedWeight.from_layout_attr(str(text)), list(value.args[1].fields)

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not (call.op.same_as(CALL_TIR) and isinstance(call.args[1], relax.Tuple)
                and len(call.args[1].fields) == 2):
            return call
        x, weight = call.args[1].fields
        found = self.packed_layout(weight)
        if found is None or not one_row(x):
            return call
        layout, packed_args = found
        x_shape = [int(d) for d in x.ty.shape.values]
        if x_shape[-1] != layout.k or [int(d) for d in call.ty.shape.values] != \
                x_shape[:-1] + [layout.n]:
            return call  # not the product of x and the weight
        key = (layout.layout_attr(), tuple(x_shape))
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(gemv_func(layout, x_shape), "gemv_int4")
        return relax.call_tir(self.kernels[key], [x, *packed_args], call.ty)


@tvm.transform.module_pass(opt_level=0, name="QuantizedGEMVKernel")
class QuantizedGEMVKernel:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not has_dequantize_kernels(mod):
            return mod
        return relax.transform.DeadCodeElimination()(
            mutate_relax_functions(_GroupedGEMV(mod), mod))
