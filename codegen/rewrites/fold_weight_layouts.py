"""FoldWeightLayouts: weights copied into a kernel's layout once, at compile time.

A schedule rule that wants a weight in another layout (the Matmul rule's column panels) writes
the copy as a layout-rewrite block at the top of its kernel. TVM's SplitLayoutRewritePreproc
moves such blocks into kernels of their own (`<kernel>_weight_prepack`, called on the weight
before the product); here each of those calls is run, on the weight's array, and replaced by a
new parameter holding the result. A weight that nothing reads in its old layout any more is
dropped, so the artifact holds each weight once, as its kernels read it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from graft.codegen.cpu.common import LAYOUT_REWRITE, blocks
from graft.codegen.rewrites.prepack_weights import _rebuild
from graft.ir.weights import bindings, drop_unused_params, function_weights
from graft.passes.pipeline import CompileState, GraftPass

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


class FoldWeightLayouts(GraftPass):
    name = "fold_weight_layouts"

    def run(self, state: CompileState) -> dict:
        if not any(_has_layout_rewrite(f) for _, f in state.mod.functions_items()):
            return {"weights": 0}
        state.mod = _split_layout_rewrites(state.mod)
        layouts: dict[str, list[str]] = {}  # weight -> names of its rewritten copies
        runners: dict = {}
        for name, signature in state.signatures.items():
            func = state.mod[name]
            weights = function_weights(func, signature)
            replace, new_params = {}, {}
            for binding in bindings(func):
                call = binding.value
                if not _is_rewrite_of_weight(call, weights):
                    continue
                weight = weights[call.args[1].fields[0]]
                kernel = call.args[0]
                if kernel not in runners:
                    runners[kernel] = _runner(state.mod[kernel], state.target)
                array = runners[kernel](state.params[weight])
                new_name = _store(state.params, layouts.setdefault(weight, []), weight, array)
                if new_name not in new_params:
                    new_params[new_name] = relax.Var(new_name, binding.var.ty)
                replace[binding.var] = new_params[new_name]
            if replace:
                state.mod[name] = _rebuild(func, replace, list(new_params.values()))
                signature.params = list(signature.params) + list(new_params)
        drop_unused_params(state)
        state.mod = relax.transform.DeadCodeElimination()(state.mod)
        return {"weights": len(layouts), "copies": sum(len(v) for v in layouts.values())}


def _has_layout_rewrite(func) -> bool:
    if not isinstance(func, tirx.PrimFunc):
        return False
    try:
        sch = s_tir.Schedule(func)
    except Exception:  # noqa: BLE001 - a written kernel without blocks has no layout rewrite
        return False
    return any(LAYOUT_REWRITE in sch.get(block).annotations for block in blocks(sch))


def _split_layout_rewrites(mod: tvm.IRModule) -> tvm.IRModule:
    """TVM's SplitLayoutRewritePreproc on the kernels that have layout rewrites (it requires
    every kernel it sees to be one root block, which written kernels need not be)."""
    others = {gv: f for gv, f in mod.functions_items()
              if isinstance(f, tirx.PrimFunc) and not _has_layout_rewrite(f)}
    part = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in others},
                        attrs=mod.attrs)
    split = relax.transform.SplitLayoutRewritePreproc()(part)
    for gv, func in others.items():
        split[gv] = func
    return split


def _is_rewrite_of_weight(call, weights: dict) -> bool:
    if not (isinstance(call, relax.Call) and call.op.same_as(CALL_TIR)):
        return False
    args = getattr(call.args[1], "fields", [])
    return call.args[0].name_hint.endswith("_weight_prepack") and len(args) == 1 and \
        isinstance(args[0], relax.Var) and args[0] in weights


def _runner(kernel: tirx.PrimFunc, target):
    """A function running the layout-rewrite kernel on a numpy array."""
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                      target=target)
    out = kernel.params[1]
    shape = [int(d) for d in out.shape]

    def run(array: np.ndarray) -> np.ndarray:
        result = tvm.runtime.tensor(np.empty(shape, str(out.dtype)))
        lib["main"](tvm.runtime.tensor(array), result)
        return result.numpy()

    return run


def _store(params: dict, copies: list[str], weight: str, array: np.ndarray) -> str:
    """The parameter holding `array`: an equal copy of the same weight made for another kernel
    (the Matmul and GEMV rules use the same panels), else a new one."""
    for name in copies:
        if params[name].shape == array.shape and np.array_equal(params[name], array):
            return name
    name = f"{weight}.panels" + (str(len(copies)) if copies else "")
    params[name] = array
    copies.append(name)
    return name
