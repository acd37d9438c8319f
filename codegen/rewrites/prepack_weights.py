"""PrepackWeights: weights read transposed are transposed once, at compile time.

`x @ W.T` (torch's Linear, ONNX Gemm with transB) reaches Relax as
`matmul(x, permute_dims(W))`. CPU matmul and GEMV kernels want the weight as [K, N], rows of
outputs contiguous, so W becomes a new parameter `W.T` holding the transposed array, and the
permute_dims disappears. W itself stays only where something else still reads it (a tied
embedding table).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from graft.ir.weights import bindings as _bindings
from graft.ir.weights import drop_unused_params, function_weights, readers_of
from graft.ir.weights import is_weight_transpose as _is_transpose_2d
from graft.passes.pipeline import CompileState, GraftPass

MATMUL = tvm.ir.Op.get("relax.matmul")


def _read_only_as_matmul_rhs(var: relax.Var, uses: dict) -> bool:
    values = uses.get(var, [])
    return bool(values) and all(
        isinstance(v, relax.Call) and v.op.same_as(MATMUL) and v.args[1].same_as(var)
        and not v.args[0].same_as(var) for v in values)


class PrepackWeights(GraftPass):
    name = "prepack_weights"

    def run(self, state: CompileState) -> dict:
        packed: dict[str, str] = {}
        state.mod = state.mod.clone()
        for name, signature in state.signatures.items():
            func = state.mod[name]
            weights = function_weights(func, signature)
            swaps, uses = {}, readers_of(func)
            for binding in _bindings(func):
                if _is_transpose_2d(binding.value, weights) and \
                        _read_only_as_matmul_rhs(binding.var, uses):
                    swaps[binding.var] = weights[binding.value.args[0]]
            if not swaps:
                continue
            new_params, replace = {}, {}
            for var, param in swaps.items():
                new_name = param + ".T"
                if new_name not in state.params:
                    state.params[new_name] = np.ascontiguousarray(state.params[param].T)
                packed[param] = new_name
                if new_name not in new_params:
                    shape = [int(d) for d in state.params[new_name].shape]
                    new_params[new_name] = relax.Var(new_name,
                                                     relax.TensorType(shape, var.ty.dtype))
                replace[var] = new_params[new_name]
            state.mod[name] = _rebuild(func, replace, list(new_params.values()))
            signature.params = list(signature.params) + list(new_params)
        still_read = self._drop_unused(state)
        return {"transposed": len(packed), "kept_original": still_read}

    @staticmethod
    def _drop_unused(state: CompileState) -> int:
        """Remove parameters no function reads any more; return how many transposed weights
        are still read in their original layout too."""
        drop_unused_params(state)
        used = {p for sig in state.signatures.values() for p in sig.params}
        return sum(1 for n in used if n + ".T" in used)


def _rebuild(func: relax.Function, replace: dict, extra_params: list) -> relax.Function:
    """The function with each `var = permute_dims(W)` turned into `var = W.T` (a new parameter,
    appended); CanonicalizeBindings then reads W.T directly where var was read."""
    blocks = []
    for block in func.body.blocks:
        bindings = [relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b
                    for b in block.bindings]
        cls = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock
        blocks.append(cls(bindings))
    body = relax.SeqExpr(blocks, func.body.body)
    rebuilt = relax.Function(list(func.params) + extra_params, body, func.ret_ty, func.is_pure,
                             func.attrs, func.span)
    return relax.transform.CanonicalizeBindings()(tvm.IRModule({"f": rebuilt}))["f"]
