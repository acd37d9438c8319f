"""NegativeIndexTake: `x[:, -1]` must select the last element.

torch.export writes `x[:, -1]` as `select(x, 1, -1)`, which TVM's importer turns into
`R.take(x, R.const(-1), axis=1, mode="fast")`; fast mode does not wrap negative indices, so the
compiled code reads out of bounds and returns garbage (or crashes). A scalar constant index
k < 0 on an axis of size n becomes `squeeze(strided_slice(x, [n + k], [n + k + 1]))`, which
works for static and symbolic n alike.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def _negative_scalar(index) -> int | None:
    if isinstance(index, tvm.ir.GenericConst):
        value = index.value.numpy()
        if value.ndim == 0 and value.dtype.kind == "i" and int(value) < 0:
            return int(value)
    return None


@mutator
class _NegativeIndexMutator(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.take = tvm.ir.Op.get("relax.take")
        self.changed = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(self.take)):
            return call
        data, index = call.args[0], call.args[1]
        k = _negative_scalar(index)
        shape = getattr(getattr(data, "ty", None), "shape", None)
        if k is None or call.attrs.axis is None or shape is None or not hasattr(shape, "values"):
            return call
        axis = int(call.attrs.axis) % len(shape.values)
        size = shape.values[axis]
        self.changed += 1
        picked = relax.op.strided_slice(data, [axis], [size + k], [size + k + 1],
                                        assume_inbound=True)
        return relax.op.squeeze(self.builder_.emit(picked), [axis])


@tvm.transform.module_pass(opt_level=0, name="NegativeIndexTake")
class NegativeIndexTake:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _NegativeIndexMutator(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get() if rewriter.changed else mod
