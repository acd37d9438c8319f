"""MarkLayoutFreeWeights: tell the schedule rules which kernel inputs are weights.

A kernel whose every caller passes a weight parameter in some position gets that position in
its `layout_free_buffers` attribute (TVM's convention): a rule may then read the weight in a
layout of its own, written by a layout-rewrite block that FoldWeightLayouts runs once, at
compile time (see `codegen/rewrites/fold_weight_layouts.py`).
"""

from __future__ import annotations

import tvm
from tvm import relax

from graft.codegen.rewrites import replace_functions
from graft.ir.weights import bindings, function_weights
from graft.passes.pipeline import CompileState, GraftPass

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


class MarkLayoutFreeWeights(GraftPass):
    name = "mark_layout_free_weights"

    def run(self, state: CompileState) -> dict:
        positions: dict = {}  # kernel GlobalVar -> argument positions holding a weight
        for name, signature in state.signatures.items():
            func = state.mod[name]
            weights = function_weights(func, signature)
            for binding in bindings(func):
                call = binding.value
                if not (isinstance(call, relax.Call) and call.op.same_as(CALL_TIR)):
                    continue
                kernel, args = call.args[0], call.args[1]
                found = {i for i, arg in enumerate(getattr(args, "fields", []))
                         if isinstance(arg, relax.Var) and arg in weights}
                positions[kernel] = found if kernel not in positions else positions[kernel] & found
        updates = {gv: state.mod[gv].with_attr("layout_free_buffers", sorted(found))
                   for gv, found in positions.items() if found}
        state.mod = replace_functions(state.mod, updates)
        return {"kernels": len(updates)}
