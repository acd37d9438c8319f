"""DedupConcat: `R.concat((x, x, ...))` becomes `R.tile(x, reps)`.

TVM 0.27's FuseTIR fails (in RenewDefs) when a fused kernel receives the same tensor twice, and
rotary embeddings write exactly that: `torch.cat((freqs, freqs), -1)`. A tile of one input
computes the same values.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _DedupConcatMutator(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.concat"):
            return call
        parts = call.args[0]
        if not (isinstance(parts, relax.Tuple) and len(parts.fields) > 1 and
                all(f.same_as(parts.fields[0]) for f in parts.fields)):
            return call
        first = parts.fields[0]
        ndim = first.ty.ndim
        reps = [1] * ndim
        reps[int(call.attrs.axis) % ndim] = len(parts.fields)
        return relax.op.tile(first, reps)


@tvm.transform.module_pass(opt_level=0, name="DedupConcat")
class DedupConcat:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _DedupConcatMutator(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()
