"""SymbolicSoftmax: softmax over a symbolic last axis runs graft's vectorized row kernel.

    y = softmax(x, axis=-1)          x [d0, .., n], n symbolic
      -> y = reshape(call_tir(softmax_rows, reshape(x, [d0 * .. , n])), x.shape)

The reshapes become views. The schedule rules leave a reduction over a symbolic length scalar
(see `codegen/cpu/softmax.py`); attention scores over a cache of any length are exactly that
(SmolLM2's 256-token prefill: 1.15-1.25 ms per layer before, about 0.5 ms with the kernel).
CPU only; static lengths keep the RowReduction rule.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from graft.codegen.cpu.softmax import softmax_rows_func
from graft.codegen.rewrites import mutate_relax_functions, shape_dims

SOFTMAX = tvm.ir.Op.get("relax.nn.softmax")


@relax.expr_functor.mutator
class _RowSoftmax(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernel = None

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not call.op.same_as(SOFTMAX):
            return call
        dims = shape_dims(call.args[0])
        if dims is None or str(call.args[0].ty.dtype) != "float32":
            return call
        if int(call.attrs.axis) not in (-1, len(dims) - 1) or isinstance(dims[-1], tirx.IntImm):
            return call
        if self.kernel is None:
            self.kernel = self.builder_.add_func(softmax_rows_func(), "softmax_rows")
        rows = tirx.IntImm("int64", 1)
        for d in dims[:-1]:
            rows = rows * d
        flat = self.builder_.emit(relax.op.reshape(call.args[0], [rows, dims[-1]]))
        out = self.builder_.emit(relax.call_tir(
            self.kernel, [flat], relax.TensorType([rows, dims[-1]], "float32")))
        return relax.op.reshape(out, dims)


@tvm.transform.module_pass(opt_level=0, name="SymbolicSoftmax")
class SymbolicSoftmax:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return mutate_relax_functions(_RowSoftmax(mod), mod)
