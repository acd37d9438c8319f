"""DerivedInputDims: inputs whose size torch.export states as a derived dim, `10*s38`.

torch.export proves some models' shapes only for sizes of a form (Wav2Vec2's feature encoder:
audio lengths that are multiples of 10) and writes the input's dim as an expression of a
hidden symbol. TVM's importer copies that into the Relax parameter,
`x: R.Tensor((batch, s38 * 10))`, where nothing defines `s38`: the module is not well formed.

For a dim `c*v + d` (v undefined elsewhere, c and d integers) the parameter gets a fresh size
variable n; the function's first bindings define `v = (n - d) // c` and match_cast the
parameter to the original form, so a size not of that form fails at the call with TVM's shape
check instead of computing garbage.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx


@tvm.transform.module_pass(opt_level=0, name="DerivedInputDims")
class DerivedInputDims:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        changed = False
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewritten = _rewrite(func)
                if rewritten is not None:
                    mod[gv] = rewritten
                    changed = True
        return relax.transform.Normalize()(mod) if changed else mod


def _rewrite(func: relax.Function) -> relax.Function | None:
    defined = {d for p in func.params for d in _dims(p) if isinstance(d, tirx.Var)}
    solved: dict[tirx.Var, tuple[int, int]] = {}  # hidden symbol: (scale, offset)
    sources: dict[tirx.Var, tuple[relax.Var, int]] = {}  # hidden symbol: (input, axis)
    fresh: dict[tuple[int, int], tirx.Var] = {}
    ranges: dict[str, tuple[str, int, int]] = {}  # new var: (old var, scale, offset)
    for index, param in enumerate(func.params):
        for axis, dim in enumerate(_dims(param)):
            if isinstance(dim, (tirx.Var, tirx.IntImm)):
                continue
            free = [v for v in tirx.analysis.undefined_vars(dim) if v not in defined]
            if len(free) != 1 or free[0] in solved:
                continue
            coeffs = tvm.sym.detect_linear_equation(dim, free)
            if len(coeffs) != 2 or not all(isinstance(c, tirx.IntImm) for c in coeffs):
                continue
            scale, offset = (int(c) for c in coeffs)
            if scale <= 0:
                continue
            size = tirx.Var(f"{param.name}_dim{axis}", "int64")
            solved[free[0]] = (scale, offset)
            sources[free[0]] = (param, axis)
            fresh[(index, axis)] = size
            ranges[size.name] = (free[0].name, scale, offset)
    if not solved:
        return None
    params, casts, outer_of = [], [], {}
    for index, param in enumerate(func.params):
        dims = _dims(param)
        if not any((index, axis) in fresh for axis in range(len(dims))):
            params.append(param)
            continue
        shape = [fresh.get((index, axis), dim) for axis, dim in enumerate(dims)]
        outer = relax.Var(param.name, relax.TensorType(shape, param.ty.dtype))
        params.append(outer)
        outer_of[param] = outer
        casts.append(relax.MatchCast(param, outer, param.ty))
    sources = {symbol: (outer_of[param], axis) for symbol, (param, axis) in sources.items()}
    casts = _define_symbols(solved, sources) + casts
    body = func.body
    blocks = [relax.BindingBlock(casts), *body.blocks]
    func = relax.Function(params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure,
                          func.attrs, func.span)
    return _carry_bounds(func, ranges)


def _define_symbols(solved: dict, sources: dict) -> list:
    """Bindings for `s38 = (x.shape[1] - offset) // scale`, computed from the input's run-time
    shape as a tensor. Written as a shape expression of the new size variable instead, Relax
    would substitute it into every shape after the binding (`x_dim1 // 10 - 1`), and neither
    TVM's shape checks nor its kernels simplify those: shapes that should unify no longer do."""
    builder = relax.BlockBuilder()
    bindings = []

    def emit(value, name):
        value = builder.normalize(value)
        var = relax.Var(name, value.ty)
        bindings.append(relax.VarBinding(var, value))
        return var

    values = []
    for symbol, (scale, offset) in solved.items():
        param, axis = sources[symbol]
        shape = emit(relax.op.shape_of(param), f"{param.name}_shape")
        shape = emit(relax.op.shape_to_tensor(shape), f"{param.name}_shape_tensor")
        size = emit(relax.op.take(shape, relax.const([axis], "int64"), axis=0), "size")
        if offset:
            size = emit(relax.op.subtract(size, relax.const(offset, "int64")), "size")
        values.append(emit(relax.op.floor_divide(size, relax.const(scale, "int64")), symbol.name))
    tensor = values[0] if len(values) == 1 else emit(relax.op.concat(values, axis=0), "symbols")
    symbols = relax.Var("derived_dims", relax.ShapeType(list(solved)))
    bindings.append(relax.MatchCast(symbols, emit(relax.op.tensor_to_shape(tensor), "shape"),
                                    symbols.ty))
    return bindings


def _carry_bounds(func: relax.Function, ranges: dict) -> relax.Function:
    """torch's bounds on the old variable (`tir_var_lower_bound`, ...) as bounds on the new."""
    for key in ("tir_var_lower_bound", "tir_var_upper_bound"):
        if not func.attrs or key not in func.attrs:
            continue
        bounds = {str(k): int(v) for k, v in func.attrs[key].items()}
        for new, (old, scale, offset) in ranges.items():
            if old in bounds:
                bounds[new] = scale * bounds[old] + offset
        func = func.with_attr(key, bounds)
    return func


def _dims(param) -> list:
    ty = param.ty
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    return []
