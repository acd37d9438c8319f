"""Feed-forward blocks of a Relax function, and shrinking their intermediate dimension.

A feed-forward block, as the importers write it:

    h = matmul(x, permute_dims(W_up))      (or matmul(x, W_up), W_up stored [K, N])
    h = add(h, b_up)                       (optional)
    a = act(h)                             gelu, gelu_tanh, silu, relu, sigmoid, tanh
      | a = multiply(act(h_gate), h_up)    (gated, SwiGLU: two up projections)
    y = matmul(a, permute_dims(W_down))
    y = add(y, b_down)                     (optional)

Channel j of the intermediate dimension is row j of every up weight (and b_up[j]) and column j
of W_down; removing the channel removes that row and column, so both products shrink. A block
is only taken when nothing else reads its weights or its intermediate values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from graft.ir.weights import MATMUL, PERMUTE, bindings, function_weights, readers_of

ADD = tvm.ir.Op.get("relax.add")
MULTIPLY = tvm.ir.Op.get("relax.multiply")
ACTIVATIONS = {tvm.ir.Op.get(f"relax.{name}") for name in (
    "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.relu", "sigmoid", "tanh")}


@dataclass
class WeightSlot:
    """A weight parameter and the axis of it that runs over the intermediate channels."""

    name: str
    axis: int


@dataclass
class FFNBlock:
    ups: list[WeightSlot]                # one per up projection (two when gated)
    down: WeightSlot
    down_bias: str | None                # [N out], added to the down projection's output
    up_biases: list[str] = field(default_factory=list)  # [width], channel axis 0
    hidden: relax.Var | None = None      # the down projection's input, for calibration taps
    width: int = 0

    @property
    def name(self) -> str:
        return self.down.name


def _call(value, ops) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
        any(value.op.same_as(op) for op in ops)


def find_ffn_blocks(func: relax.Function, signature) -> list[FFNBlock]:
    """Every feed-forward block of `func` (see the module docstring)."""
    weights = function_weights(func, signature)
    values = relax.analysis.get_var2val(func)
    readers = readers_of(func)

    def only_reader(var) -> bool:
        return len(readers.get(var, [])) == 1

    def weight_read(expr):
        """(name, transposed) when `expr` is a 2-D weight read as stored or through
        permute_dims, and read nowhere else."""
        if expr in weights and only_reader(expr):
            return weights[expr], False
        value = values.get(expr)
        if _call(value, [PERMUTE]) and value.args[0] in weights and only_reader(value.args[0]) \
                and only_reader(expr) and (value.attrs.axes is None or
                                           [int(a) for a in value.attrs.axes] == [1, 0]):
            return weights[value.args[0]], True
        return None

    def bias(expr):
        """A 1-D weight read only here."""
        return weights[expr] if expr in weights and only_reader(expr) and \
            len(expr.ty.shape.values) == 1 else None

    def up_projection(var):
        """(WeightSlot, bias name or None) when `var` is an up projection's (biased) output."""
        if not only_reader(var):
            return None
        value, bias_name = values.get(var), None
        if _call(value, [ADD]):
            lhs, rhs = value.args
            bias_name = bias(rhs) or bias(lhs)
            if bias_name is None:
                return None
            var = lhs if bias(rhs) else rhs
            if not only_reader(var):
                return None
            value = values.get(var)
        if not (_call(value, [MATMUL]) and str(value.args[0].ty.dtype) == "float32"):
            return None
        read = weight_read(value.args[1])
        if read is None:
            return None
        name, transposed = read
        return WeightSlot(name, 0 if transposed else 1), bias_name

    blocks = []
    for b in bindings(func):
        down = b.value
        if not (_call(down, [MATMUL]) and str(down.args[0].ty.dtype) == "float32"):
            continue
        read = weight_read(down.args[1])
        hidden = down.args[0]
        if read is None or not only_reader(hidden):
            continue
        act = values.get(hidden)
        if _call(act, ACTIVATIONS):
            ups = [up_projection(act.args[0])]
        elif _call(act, [MULTIPLY]) and all(isinstance(a, relax.Var) for a in act.args):
            gate = next((a for a in act.args if _call(values.get(a), ACTIVATIONS)
                         and only_reader(a)), None)
            if gate is None:
                continue
            other = act.args[1] if gate.same_as(act.args[0]) else act.args[0]
            ups = [up_projection(values[gate].args[0]), up_projection(other)]
        else:
            continue
        if any(u is None for u in ups):
            continue
        name, transposed = read
        block = FFNBlock([u[0] for u in ups], WeightSlot(name, 1 if transposed else 0),
                         None, [u[1] for u in ups if u[1] is not None], hidden)
        out_readers = readers.get(b.var, [])
        if len(out_readers) == 1 and _call(out_readers[0], [ADD]):
            block.down_bias = next((bias(a) for a in out_readers[0].args if bias(a)), None)
        blocks.append(block)
    return blocks


def shapes_of(func: relax.Function, signature) -> dict[str, tuple]:
    return {name: tuple(int(d) for d in var.ty.shape.values)
            for var, name in function_weights(func, signature).items()}


@relax.expr_functor.mutator
class _Reshaped(relax.PyExprMutator):
    """Re-emits a function body with some parameters replaced (shapes re-inferred)."""


def resize_weights(state, new_shapes: dict[str, tuple]) -> None:
    """Give the weights named in `new_shapes` their new shapes in every function of `state`
    (the arrays in `state.params` must already have them); every binding's shape is inferred
    again from its operands."""
    mutator = _Reshaped(state.mod)
    updated = {}
    for fname, signature in state.signatures.items():
        func = state.mod[fname]
        params = []
        for var in func.params:
            name = function_weights(func, signature).get(var)
            if name in new_shapes:
                new = relax.Var(var.name, relax.TensorType(list(new_shapes[name]),
                                                                var.ty.dtype))
                mutator.set_var_remap(var, new)
                var = new
            params.append(var)
        body = mutator.visit_expr(func.body)
        updated[fname] = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs,
                                        func.span)
    mod = state.mod
    for fname, func in updated.items():
        mod[mod.get_global_var(fname)] = func
    state.mod = relax.transform.Normalize()(mod)


def take_channels(array: np.ndarray, axis: int, kept: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.take(array, kept, axis=axis))
