"""Layer discovery: where a function's computation passes through one tensor.

A *cut* is a binding after which the rest of the function reads, of everything computed so far,
only that binding's tensor (besides the weights, and values computed from the inputs alone,
such as an attention mask). The hidden state there is everything later layers know about the
input, so an exit head can read it, and the layers after it can be skipped.

Cuts are grouped into *layers* by the number of weighted ops (matmul, convolution) before them:
the last cut before the next weighted op ends a layer (after its activation, pooling or
residual add). A layer's FLOPs are those of its weighted ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from graft.ir.stats import op_flops
from graft.ir.weights import bindings

WEIGHTED_OPS = {"relax.matmul", "relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d"}


@dataclass
class LayerEnd:
    """The hidden state after a layer: `var`, bound at binding `position`."""

    index: int              # weighted ops before it (layer 1 ends after the first one)
    var: relax.Var
    position: int
    flops_before: int       # FLOPs of the weighted ops before it
    shape: tuple[int, ...]  # static dims, -1 where symbolic


def layer_ends(func: relax.Function, weights: dict, dims: dict | None = None) -> list[LayerEnd]:
    """The end of every layer of `func` except the last (whose end is the output), in order.
    `weights`: the weight parameters ({Var: name}); `dims`: sizes of symbolic dims for FLOPs."""
    flat = bindings(func)
    position = {b.var: i for i, b in enumerate(flat)}
    last_use = _last_uses(func, flat, position)
    heavy = _depends_on_weighted_op(flat)
    counted, flops = 0, 0
    live: set = set()
    candidates = []
    for i, b in enumerate(flat):
        if _is_weighted_op(b.value):
            counted += 1
            flops += op_flops(b.value, dims or {})
        if last_use.get(b.var, -1) > i:
            live.add(b.var)
        live = {v for v in live if last_use[v] > i}
        heavy_live = [v for v in live if heavy.get(v, False)]
        if heavy_live == [b.var] and counted > 0 and _is_hidden_state(b.var):
            candidates.append(LayerEnd(counted, b.var, i, flops, _static_shape(b.var)))
    total = sum(1 for b in flat if _is_weighted_op(b.value))
    ends: dict[int, LayerEnd] = {}
    for cut in candidates:
        if cut.index < total:
            ends[cut.index] = cut  # the last cut with this many weighted ops before it
    return sorted(ends.values(), key=lambda c: c.position)


def total_flops(func: relax.Function, dims: dict | None = None) -> int:
    return int(sum(op_flops(b.value, dims or {}) for b in bindings(func)
                   if _is_weighted_op(b.value)))


def _last_uses(func: relax.Function, flat: list, position: dict) -> dict:
    """For every var bound in `func`, the last binding position reading it (len(flat) for the
    result)."""
    last: dict = {}
    for i, b in enumerate(flat):
        for var in relax.analysis.free_vars(b.value):
            if var in position:
                last[var] = i
    for var in relax.analysis.free_vars(func.body.body):
        if var in position:
            last[var] = len(flat)
    return last


def _depends_on_weighted_op(flat: list) -> dict:
    heavy: dict = {}
    for b in flat:
        heavy[b.var] = _is_weighted_op(b.value) or any(
            heavy.get(v, False) for v in relax.analysis.free_vars(b.value))
    return heavy


def _is_weighted_op(value) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
        value.op.name in WEIGHTED_OPS


def _is_hidden_state(var: relax.Var) -> bool:
    ty = var.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype).startswith("float") and \
        ty.ndim in (2, 3, 4)


def _static_shape(var: relax.Var) -> tuple[int, ...]:
    shape = var.ty.shape
    if not isinstance(shape, relax.ShapeExpr):
        return tuple([-1] * var.ty.ndim)
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else -1 for d in shape.values)
