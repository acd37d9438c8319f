"""OrderAfterMatchCast: every binding comes after the match_cast that defines the symbolic
sizes it uses.

A size read from data at run time (a window of run-time length: `tensor_to_shape`, then
`match_cast` into a fresh `n`) is defined where the match_cast binds it. FuseOps does not count
that as a dependency: a group that holds both an op ahead of the match_cast and one that uses
`n` is called where its first op was, before `n` exists, and the module is no longer well
formed ("Var n is not defined"). This pass moves such calls down, keeping every other binding
where it was: a stable topological order over the block's variables and symbolic sizes.
"""

from __future__ import annotations

import heapq

import tvm
from tvm import relax
from tvm.relax.analysis import (definable_tir_vars_in_type, free_symbolic_vars, free_vars,
                                 tir_vars_in_type)

from graft.codegen.rewrites import replace_functions
from graft.runtime.errors import GraftError


def _symbolic_vars_used(binding) -> set:
    used = set(free_symbolic_vars(binding.value))
    if isinstance(binding, relax.MatchCast):
        return used  # the vars in its type are what it defines (or checks)
    return used | set(tir_vars_in_type(binding.var.ty))


def _order_block(block: relax.BindingBlock, defined_before: set) -> relax.BindingBlock:
    bindings = list(block.bindings)
    producer = {b.var: i for i, b in enumerate(bindings)}
    sym_producer = {}
    for index, binding in enumerate(bindings):
        if isinstance(binding, relax.MatchCast):
            for var in definable_tir_vars_in_type(binding.ty):
                if var not in defined_before and var not in sym_producer:
                    sym_producer[var] = index
    if not sym_producer:
        return block
    needs = []
    for index, binding in enumerate(bindings):
        deps = {producer[v] for v in free_vars(binding.value) if v in producer}
        deps |= {sym_producer[v] for v in _symbolic_vars_used(binding)
                 if v in sym_producer and sym_producer[v] != index}
        needs.append(deps)
    if all(max(deps, default=-1) < index for index, deps in enumerate(needs)):
        return block
    waiting = [len(deps) for deps in needs]
    users = [[] for _ in bindings]
    for index, deps in enumerate(needs):
        for dep in deps:
            users[dep].append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(bindings):
        stuck = [bindings[i].var.name_hint for i in range(len(bindings)) if i not in set(order)]
        raise GraftError("a fused call both feeds and uses a size defined by match_cast; no "
                         f"order of the bindings works: {', '.join(stuck)}")
    ordered = [bindings[i] for i in order]
    if isinstance(block, relax.DataflowBlock):
        return relax.DataflowBlock(ordered, block.span)
    return relax.BindingBlock(ordered, block.span)


def _order_function(func: relax.Function) -> relax.Function:
    if not isinstance(func.body, relax.SeqExpr):
        return func
    defined = set()
    for param in func.params:
        defined |= set(definable_tir_vars_in_type(param.ty))
    blocks = []
    for block in func.body.blocks:
        blocks.append(_order_block(block, defined))
        for binding in block.bindings:
            if isinstance(binding, relax.MatchCast):
                defined |= set(definable_tir_vars_in_type(binding.ty))
    if all(new.same_as(old) for new, old in zip(blocks, func.body.blocks)):
        return func
    body = relax.SeqExpr(blocks, func.body.body, func.body.span)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


@tvm.transform.module_pass(opt_level=0, name="OrderAfterMatchCast")
class OrderAfterMatchCast:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                ordered = _order_function(func)
                if not ordered.same_as(func):
                    updates[gv] = ordered
        return relax.transform.Normalize()(replace_functions(mod, updates)) if updates else mod
