"""ExitBranches: a function with early exits returns from the first confident one.

EarlyExit (passes/early_exit) leaves a function whose result is (output, logits_0, ok_0, ...,
logits_{E-1}, ok_{E-1}), every exit's head and test computed in the one dataflow block, so that
every lowering pass (fusion, weight layouts, scheduling) sees one flat graph. This entry runs
last and splits that graph:

    <what exit 0 needs>                      (bindings no earlier exit needs, in order)
    if ok_0: (logits_0, 0)
    else:
        <what exit 1 needs>
        if ok_1: (logits_1, 1)
        else: ... <the rest>; (output, E)

A binding goes to the first exit whose head or test depends on it; those no exit needs run
only when no exit was taken. Blocks become plain binding blocks (branches read values bound
outside them); dataflow reshapes are turned into views first, as the build would.
"""

from __future__ import annotations

import tvm
from tvm import relax

EXITS_ATTR = "graft.early_exit"


@tvm.transform.module_pass(opt_level=0, name="ExitBranches")
class ExitBranches:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        marked = [gv for gv, f in mod.functions_items()
                  if isinstance(f, relax.Function) and f.attrs is not None
                  and EXITS_ATTR in f.attrs]
        if not marked:
            return mod
        mod = relax.transform.RewriteDataflowReshape()(mod)
        mod = relax.transform.ToNonDataflow()(mod)
        for gv in marked:
            func = mod[gv]
            mod[gv] = split(func, int(func.attrs[EXITS_ATTR]))
        return relax.transform.Normalize()(mod)


def split(func: relax.Function, exits: int) -> relax.Function:
    flat = [b for block in func.body.blocks for b in block.bindings]
    bound = {b.var: b.value for b in flat}
    result = func.body.body
    fields = list(bound[result].fields) if isinstance(result, relax.Var) and \
        isinstance(bound.get(result), relax.Tuple) else list(result.fields)
    output, pairs = fields[0], [(fields[1 + 2 * i], fields[2 + 2 * i]) for i in range(exits)]
    stage = {}
    for i, (logits, ok) in enumerate(pairs):
        for var in _needed(bound, [logits, ok]):
            stage.setdefault(var, i)
    per_stage = [[] for _ in range(exits + 1)]
    for b in flat:
        if b.var.same_as(result):
            continue  # the result tuple: rebuilt per branch
        per_stage[stage.get(b.var, exits)].append(b)

    body = _returning(per_stage[exits], output, exits)
    for i in reversed(range(exits)):
        logits, ok = pairs[i]
        taken = _returning([], logits, i)
        branch = relax.BlockBuilder().normalize(relax.If(ok, taken, body))
        chosen = relax.Var(f"exit{i}_result", branch.ty)
        body = _seq(per_stage[i] + [relax.VarBinding(chosen, branch)], chosen)
    new = relax.Function(func.params, body, body.body.ty, func.is_pure, func.attrs)
    return new.without_attr(EXITS_ATTR)


def _needed(bound: dict, roots: list) -> set:
    """The bound vars `roots` depend on, themselves included."""
    seen, pending = set(), [r for r in roots if isinstance(r, relax.Var)]
    while pending:
        var = pending.pop()
        if var in seen or var not in bound:
            continue
        seen.add(var)
        pending.extend(relax.analysis.free_vars(bound[var]))
    return seen


def _returning(bindings: list, value, index: int) -> relax.SeqExpr:
    """`bindings`, then (value, index) returned."""
    return _seq(bindings, relax.Tuple([value, relax.const(index, "int32")]))


def _seq(bindings: list, result) -> relax.SeqExpr:
    return relax.SeqExpr([relax.BindingBlock(bindings)] if bindings else [], result)
