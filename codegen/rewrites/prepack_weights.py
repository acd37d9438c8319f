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

from graft.passes.pipeline import CompileState, GraftPass

PERMUTE = tvm.ir.Op.get("relax.permute_dims")
MATMUL = tvm.ir.Op.get("relax.matmul")


def _is_transpose_2d(value, weights: dict) -> bool:
    if not (isinstance(value, relax.Call) and value.op.same_as(PERMUTE)):
        return False
    arg = value.args[0]
    if not (isinstance(arg, relax.Var) and arg in weights):
        return False
    shape = getattr(arg.ty, "shape", None)
    if shape is None or not hasattr(shape, "values") or len(shape.values) != 2:
        return False
    axes = value.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def _bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings]


def _uses(func: relax.Function) -> dict:
    """For every variable, the binding values (and the function result) that read it."""
    uses: dict = {}
    for binding in _bindings(func):
        for var in relax.analysis.free_vars(binding.value):
            uses.setdefault(var, []).append(binding.value)
    for var in relax.analysis.free_vars(func.body.body):
        uses.setdefault(var, []).append(None)
    return uses


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
            n_inputs = len(func.params) - len(signature.params)
            weights = dict(zip(func.params[n_inputs:], signature.params))
            swaps, uses = {}, _uses(func)
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
        used = set()
        for name, signature in state.signatures.items():
            func = state.mod[name]
            n_inputs = len(func.params) - len(signature.params)
            free = relax.analysis.free_vars(func.body)
            keep_vars, keep_names = list(func.params[:n_inputs]), []
            for var, param in zip(func.params[n_inputs:], signature.params):
                if any(var.same_as(f) for f in free):
                    keep_vars.append(var)
                    keep_names.append(param)
            used |= set(keep_names)
            if len(keep_names) != len(signature.params):
                state.mod[name] = relax.Function(keep_vars, func.body, func.ret_ty,
                                                 func.is_pure, func.attrs, func.span)
                signature.params = keep_names
        both = sum(1 for n in used if n + ".T" in used)
        for name in [n for n in state.params if n not in used]:
            del state.params[name]
        return both


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
