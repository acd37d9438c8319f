"""Module statistics for dumps and reports: op counts by kind, parameter bytes, estimated FLOPs.

FLOPs count multiply-accumulates as 2 (matmuls, convolutions, and any TIR reduction after
legalization); element-wise work is not counted. Symbolic dims are evaluated at the sizes given
(from the example inputs), 1 where unknown.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import tvm
from tvm import relax, tirx

_TRAILING_NUMBER = re.compile(r"\d+$")


def op_counts(mod: tvm.IRModule) -> dict[str, int]:
    """Calls by kind: Relax ops by name (`matmul`), TIR kernels by PrimFunc name without its
    numeric suffix (`fused_matmul_add`), and calls to other Relax functions."""
    counts: Counter = Counter()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function) or _is_primitive(func):
            continue
        for call in _calls(func):
            counts[_kind(call)] += 1
    return dict(sorted(counts.items()))


def param_bytes(params: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in params.values()))


def estimate_flops(mod: tvm.IRModule, dims: dict[str, int] | None = None) -> int:
    """FLOPs of one call of every Relax function in the module, added up."""
    dims = dims or {}
    total = 0
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function) or _is_primitive(func):
            continue  # a fused function counts once per call of it, where it is called
        for call in _calls(func):
            total += _call_flops(mod, call, dims)
    return int(total)


def _is_primitive(func: relax.Function) -> bool:
    """A fused group made by FuseOps: its calls are counted where it is called."""
    return bool(func.attrs and "Primitive" in func.attrs and int(func.attrs["Primitive"]))


def _calls(func: relax.Function):
    calls = []
    relax.analysis.post_order_visit(func.body, lambda e: calls.append(e)
                                    if isinstance(e, relax.Call) else None)
    return calls


def _kind(call: relax.Call) -> str:
    if isinstance(call.op, tvm.ir.Op):
        name = call.op.name
        if name in ("relax.call_tir", "relax.call_tir_inplace", "relax.call_dps_packed") and \
                isinstance(call.args[0], (tvm.ir.GlobalVar, relax.ExternFunc)):
            target = call.args[0]
            label = target.name_hint if isinstance(target, tvm.ir.GlobalVar) else target.global_symbol
            return _TRAILING_NUMBER.sub("", label)
        return name.removeprefix("relax.")
    if isinstance(call.op, tvm.ir.GlobalVar):
        return _TRAILING_NUMBER.sub("", call.op.name_hint)
    return "call"


def _static(shape_expr, dims) -> list[int] | None:
    values = []
    for d in shape_expr:
        v = _eval(d, dims)
        if v is None:
            return None
        values.append(v)
    return values


def _eval(expr, dims) -> int | None:
    if isinstance(expr, (int, np.integer)):
        return int(expr)
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    analyzer = tvm.sym.Analyzer()
    for var in tirx.analysis.undefined_vars(expr):
        analyzer.bind(var, tirx.IntImm(str(var.ty.dtype), dims.get(var.name, 1)))
    value = analyzer.simplify(expr)
    return int(value.value) if isinstance(value, tirx.IntImm) else None


def _shape(expr, dims) -> list[int] | None:
    sinfo = expr.ty
    if isinstance(sinfo, relax.TensorType) and isinstance(sinfo.shape, relax.ShapeExpr):
        return _static(sinfo.shape.values, dims)
    return None


def op_flops(call: relax.Call, dims: dict) -> int:
    """FLOPs of a Relax matmul or convolution call (0 for any other op)."""
    if not isinstance(call.op, tvm.ir.Op):
        return 0
    name = call.op.name
    if name == "relax.matmul":
        out, lhs = _shape(call, dims), _shape(call.args[0], dims)
        return 2 * int(np.prod(out)) * lhs[-1] if out is not None and lhs else 0
    if name in ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d"):
        out, weight = _shape(call, dims), _shape(call.args[1], dims)
        return 2 * int(np.prod(out)) * int(np.prod(weight[1:])) if out and weight else 0
    return 0


def _call_flops(mod, call: relax.Call, dims) -> int:
    if isinstance(call.op, tvm.ir.GlobalVar):  # a fused (primitive) function FuseOps made
        func = mod[call.op]
        if isinstance(func, relax.Function) and _is_primitive(func):
            return sum(_call_flops(mod, inner, dims) for inner in _calls(func))
        return 0
    if not isinstance(call.op, tvm.ir.Op):
        return 0
    if call.op.name != "relax.call_tir":
        return op_flops(call, dims)
    if isinstance(call.args[0], tvm.ir.GlobalVar):
        prim = mod[call.args[0]]
        if isinstance(prim, tirx.PrimFunc):
            args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
            return _tir_reduction_flops(prim, args, call, dims)
    return 0


def _tir_reduction_flops(prim: tirx.PrimFunc, args, call, dims) -> int:
    """2 x (product of a reduction block's iteration extents), for each reduction block."""
    shapes = [_shape(a, dims) for a in args]
    out_sinfo = call.ty_args[0] if call.ty_args else None
    outs = out_sinfo.fields if isinstance(out_sinfo, relax.TupleType) else [out_sinfo]
    for o in outs:
        shapes.append(_static(o.shape.values, dims) if o is not None and isinstance(
            getattr(o, "shape", None), relax.ShapeExpr) else None)
    bound: dict[str, int] = {}
    for param, shape in zip(prim.params, shapes):
        try:
            param_shape = param.shape  # a PrimFunc parameter is a buffer-typed Var
        except AttributeError:
            continue
        if shape is None:
            continue
        for d, v in zip(param_shape, shape):
            if isinstance(d, tirx.Var):
                bound[d.name] = v
    from tvm import s_tir

    total = 0
    try:
        sch = s_tir.Schedule(prim)
        pending = list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # a PrimFunc without the usual root block: no estimate
        return 0
    while pending:
        block_rv = pending.pop()
        block = sch.get(block_rv)
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
            extents = [_eval(iv.dom.extent, bound) for iv in block.iter_vars]
            if all(e is not None for e in extents):
                total += 2 * int(np.prod(extents))
        pending.extend(sch.get_child_blocks(block_rv))
    return total
