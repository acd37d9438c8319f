"""The Relax rewrite of Quantize: quantized weights are read through expansion kernels.

    t = permute_dims(W)              t = call_tir(dequantize, (W.q, W.scale, W.offset))
    y = matmul(x, t)          ->     y = matmul(x, t)
    y = matmul(x, W)          ->     y = matmul(x, call_tir(dequantize, (...)))
    e = take(W, ids, axis=0)  ->     e = reshape(call_tir(gather, (..., reshape(ids, [-1]))))

The packed arrays become new weight parameters `W.q`, `W.scale` (and `W.offset`); W itself is
dropped once nothing reads it.
"""

from __future__ import annotations

import tvm
from tvm import relax

from graft.ir.weights import MATMUL, PERMUTE, TAKE, drop_unused_params, function_weights
from graft.passes.quantize import formats


@relax.expr_functor.mutator
class _ReadPacked(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, packed: dict):
        super().__init__(mod)
        self.packed = packed      # weight name -> PackedWeight
        self.weights: dict = {}   # this function's weight Var -> name
        self.new_params: dict = {}  # name -> [Var per role], this function's
        self.kernels: dict = {}   # (kind, key) -> GlobalVar

    def start(self, weights: dict) -> None:
        self.weights, self.new_params = weights, {}

    def added(self) -> list:
        return [var for vars_ in self.new_params.values() for var in vars_]

    def packed_of(self, expr):
        if isinstance(expr, relax.Var) and expr in self.weights and \
                self.weights[expr] in self.packed:
            return self.weights[expr]
        return None

    def params_of(self, name: str) -> list:
        if name not in self.new_params:
            packed = self.packed[name]
            shapes = packed.shapes()
            self.new_params[name] = [
                relax.Var(f"{name}.{role}", relax.TensorType(list(shapes[role][0]),
                                                             shapes[role][1]))
                for role in packed.roles()]
        return self.new_params[name]

    def kernel(self, kind: str, packed: formats.PackedWeight, ids_dtype: str = ""):
        key = (kind, packed.layout_attr(), ids_dtype)
        if key not in self.kernels:
            func = formats.dequantize_func(packed) if kind == "dequantize" else \
                formats.gather_func(packed, ids_dtype)
            label = f"{kind}_{packed.scheme}"
            self.kernels[key] = self.builder_.add_func(func, label)
        return self.kernels[key]

    def dequantized(self, name: str):
        packed = self.packed[name]
        return relax.call_tir(self.kernel("dequantize", packed), self.params_of(name),
                              relax.TensorType([packed.k, packed.n], "float32"))

    def visit_call_(self, call: relax.Call):
        if call.op.same_as(PERMUTE) and self.packed_of(call.args[0]) is not None:
            return self.dequantized(self.packed_of(call.args[0]))
        if call.op.same_as(MATMUL) and self.packed_of(call.args[1]) is not None:
            weight = self.builder_.emit(self.dequantized(self.packed_of(call.args[1])))
            return relax.op.matmul(self.visit_expr(call.args[0]), weight,
                                   out_dtype=call.attrs.out_dtype)
        if call.op.same_as(TAKE) and self.packed_of(call.args[0]) is not None:
            return self.gather(self.packed_of(call.args[0]), self.visit_expr(call.args[1]))
        return super().visit_call_(call)

    def gather(self, name: str, ids):
        packed = self.packed[name]
        ids_shape = list(ids.ty.shape.values)
        flat = self.builder_.emit(relax.op.reshape(ids, [-1]))
        count = flat.ty.shape.values[0]
        rows = self.builder_.emit(relax.call_tir(
            self.kernel("gather", packed, str(ids.ty.dtype)), [*self.params_of(name), flat],
            relax.TensorType([count, packed.k], "float32")))
        return relax.op.reshape(rows, [*ids_shape, packed.k])


def rewrite_functions(state, mutator, array_of) -> None:
    """Run `mutator` over every function of `state`. Per function, `mutator.start(weights)`
    resets it and `mutator.added()` lists the parameters it created; they are appended to the
    function and its signature, each with its array `array_of(name)`. Parameters nothing reads
    any more are dropped."""
    updated, arrays = {}, {}
    for fname, signature in state.signatures.items():
        func = state.mod[fname]
        mutator.start(function_weights(func, signature))
        body = mutator.visit_expr(func.body)
        added = mutator.added()
        updated[fname] = relax.Function(list(func.params) + added, body, func.ret_ty,
                                        func.is_pure, func.attrs, func.span)
        signature.params = list(signature.params) + [v.name for v in added]
        arrays.update({v.name: array_of(v.name) for v in added})
    mod = mutator.builder_.get()
    for fname, func in updated.items():
        mod[mod.get_global_var(fname)] = func
    state.mod = relax.transform.DeadCodeElimination()(relax.transform.Normalize()(mod))
    state.params.update(arrays)
    drop_unused_params(state)


def rewrite(state, packed: dict, reads: dict) -> None:
    """Rewrite every function of `state` to read the weights in `packed` ({name:
    PackedWeight}) through expansion kernels; the packed arrays become parameters."""
    if not packed:
        return

    def array_of(param: str):
        name, role = param.rsplit(".", 1)
        return packed[name].arrays[role]

    rewrite_functions(state, _ReadPacked(state.mod, packed), array_of)
