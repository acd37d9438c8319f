"""How a function reads its weights: which parameters are linear layers' weights, which are
embedding tables, and helpers to add and drop weight parameters.

A function's parameters are its inputs followed by its weights, named by the signature's
`params` list (see `graft.frontend.imported.FunctionSignature`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

PERMUTE = tvm.ir.Op.get("relax.permute_dims")
MATMUL = tvm.ir.Op.get("relax.matmul")
TAKE = tvm.ir.Op.get("relax.take")


@dataclass
class WeightReads:
    """How one weight parameter is read, over every function of the module."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    linear: int = 0        # reads as a matmul's right operand, W [N, K] through permute_dims
    linear_kn: int = 0     # reads as a matmul's right operand as stored, W [K, N]
    embedding: int = 0     # reads as take(W, ids, axis=0)
    other: list[str] = field(default_factory=list)  # any other read (op names)

    @property
    def is_linear(self) -> bool:
        """Read only as linear layers' weights (and, tied to them, as an embedding table)."""
        return (self.linear + self.linear_kn) > 0 and not self.other and len(self.shape) == 2


def function_weights(func: relax.Function, signature) -> dict:
    """{parameter Var: weight name} for the function's weight parameters."""
    n_inputs = len(func.params) - len(signature.params)
    return dict(zip(func.params[n_inputs:], signature.params))


def bindings(func: relax.Function) -> list:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings]


def readers_of(func: relax.Function) -> dict:
    """For every variable, the binding values that read it (None: the function's result)."""
    readers: dict = {}
    for binding in bindings(func):
        for var in relax.analysis.free_vars(binding.value):
            readers.setdefault(var, []).append(binding.value)
    for var in relax.analysis.free_vars(func.body.body):
        readers.setdefault(var, []).append(None)
    return readers


def is_weight_transpose(value, weights: dict) -> bool:
    """`permute_dims(W)` of a 2-D weight W, axes (1, 0)."""
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


def weight_reads(mod: tvm.IRModule, signatures: dict) -> dict[str, WeightReads]:
    """For every weight, how the module's functions read it."""
    found: dict[str, WeightReads] = {}
    for fname, signature in signatures.items():
        func = mod[fname]
        weights = function_weights(func, signature)
        for var, name in weights.items():
            if name not in found:
                shape = tuple(int(d) for d in var.ty.shape.values)
                found[name] = WeightReads(name, shape, str(var.ty.dtype))
        transposes = {b.var: weights[b.value.args[0]] for b in bindings(func)
                      if is_weight_transpose(b.value, weights)}
        readers = readers_of(func)
        for var, name in weights.items():
            record = found[name]
            for value in readers.get(var, []):
                if value is not None and value.op.same_as(PERMUTE) and \
                        is_weight_transpose(value, weights):
                    continue  # counted through the transposed var's readers below
                if _is_rhs_of_matmul(value, var):
                    record.linear_kn += 1
                elif _is_embedding_take(value, var):
                    record.embedding += 1
                else:
                    record.other.append(_op_name(value))
        for tvar, name in transposes.items():
            for value in readers.get(tvar, []):
                if _is_rhs_of_matmul(value, tvar):
                    found[name].linear += 1
                else:
                    found[name].other.append(f"permute_dims -> {_op_name(value)}")
    return found


def _is_rhs_of_matmul(value, var) -> bool:
    return isinstance(value, relax.Call) and value.op.same_as(MATMUL) and \
        value.args[1].same_as(var) and not value.args[0].same_as(var)


def _is_embedding_take(value, var) -> bool:
    return isinstance(value, relax.Call) and value.op.same_as(TAKE) and \
        value.args[0].same_as(var) and int(value.attrs.axis) == 0


def _op_name(value) -> str:
    if value is None:
        return "function output"
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name.removeprefix("relax.")
    return type(value).__name__


def drop_unused_params(state) -> None:
    """Remove weight parameters no function reads any more, from the functions, their
    signatures and the parameter dict."""
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
    for name in [n for n in state.params if n not in used]:
        del state.params[name]
