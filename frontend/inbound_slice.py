"""InboundStridedSlice: use the bounds torch proved on symbolic dims to simplify slices.

`position_ids[:, :S]` on a 512-entry buffer imports as a strided_slice whose shape is
`min(S, 512)`, and later ops that combine it with an `S`-shaped tensor lose their shape (the
build then fails in CodeGenVM). torch.export has already proved S <= 512, and the importer
records that in the function's `tir_var_lower_bound` / `tir_var_upper_bound` attributes. With
those bounds the slice is provably in bounds (`assume_inbound=True`, shape `S`), and shape
expressions such as `R.shape([T.min(S, 512)])` simplify to `R.shape([S])`. Downstream shapes
are re-inferred as the mutator rebuilds the function. Negative constant bounds count from the
end: `x[..., :-1]` (Wav2Vec2's positional convolution) has shape `S - 1` once `S >= 1` is known;
a constant end past every possible size (`x[:, 1:]` ends at INT64_MAX) ends at the size.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def bound_analyzer(func: relax.Function):
    analyzer = tvm.sym.Analyzer()
    attrs = func.attrs or {}
    lower = dict(attrs["tir_var_lower_bound"]) if "tir_var_lower_bound" in attrs else {}
    upper = dict(attrs["tir_var_upper_bound"]) if "tir_var_upper_bound" in attrs else {}
    for var in relax.analysis.defined_symbolic_vars(func):
        low = int(lower.get(var.name, 0))  # shape dims are never negative
        if var.name in upper:
            analyzer.bind(var, tvm.ir.Range.from_min_extent(low, int(upper[var.name]) - low + 1))
        else:
            analyzer.update(var, tvm.sym.ConstIntBound(low, tvm.sym.ConstIntBound.POS_INF))
    return analyzer


@mutator
class _InboundSliceMutator(PyExprMutator):
    def __init__(self, mod, analyzer):
        super().__init__(mod)
        self.analyzer = analyzer
        self.strided_slice = tvm.ir.Op.get("relax.strided_slice")
        self.changed = 0

    def visit_shape_expr_(self, op):
        values = [self.analyzer.simplify(v) for v in op.values]
        if all(a.same_as(b) for a, b in zip(values, op.values)):
            return op
        self.changed += 1
        return relax.ShapeExpr(values)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(self.strided_slice)) or \
                call.attrs.assume_inbound:
            return call
        data, axes, begin, end = call.args[:4]
        strides = call.args[4] if len(call.args) > 4 else None
        shape = getattr(getattr(data, "ty", None), "shape", None)
        if shape is None or not hasattr(shape, "values"):
            return call
        dims = shape.values
        prove = self.analyzer.can_prove
        begins, ends = [], []
        for i, axis in enumerate(axes.fields):
            axis = int(axis) % len(dims)
            b, e = (_from_end(v, dims[axis]) for v in (begin.fields[i], end.fields[i]))
            if isinstance(e, tvm.tirx.IntImm) and prove(e >= dims[axis]):
                e = dims[axis]  # `x[:, 1:]` ends at INT64_MAX
            stride = strides.fields[i] if strides is not None else 1
            if not isinstance(stride, (int, tvm.tirx.IntImm)) or int(stride) != 1:
                return call
            if not (prove(b >= 0) and prove(e <= dims[axis]) and prove(b <= e)):
                return call
            begins.append(b)
            ends.append(e)
        self.changed += 1
        return relax.op.strided_slice(data, list(axes.fields), begins, ends,
                                      list(strides.fields) if strides is not None else None,
                                      assume_inbound=True)


def _from_end(index, size):
    """A negative constant index counts from the end (`x[:, :-1]` ends at size - 1)."""
    if isinstance(index, tvm.tirx.IntImm) and int(index) < 0:
        return size + int(index)
    return index


@tvm.transform.module_pass(opt_level=0, name="InboundStridedSlice")
class InboundStridedSlice:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mod.clone()
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator_ = _InboundSliceMutator(mod, bound_analyzer(func))
                new_func = mutator_.visit_expr(func)
                if mutator_.changed:
                    mod[gv] = new_func
        return mod
