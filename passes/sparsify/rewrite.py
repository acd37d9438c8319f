"""The Relax rewrite of Sparsify's weight patterns: a pruned linear layer reads its sparse
arrays through a kernel that skips the zeros (see `graft.codegen.sparse`).

    t = permute_dims(W)                x2 = reshape(x, [rows, K])         (x of rank > 2 only)
    y = matmul(x, t)            ->     y2 = call_tir(bsr_matmul, (x2, W.data, W.indices, W.indptr))
                                       y  = reshape(y2, [..., N])
    (p:16: call_tir(p16_matmul, (x2, W.values, W.index)); unstructured: call_tir(
     unstructured_matmul, (x2, W.values, W.index, W.offsets)))

W itself is dropped once nothing reads it.
"""

from __future__ import annotations

import tvm
from tvm import relax

from graft.codegen import sparse
from graft.ir.weights import MATMUL, PERMUTE
from graft.passes.quantize.rewrite import rewrite_functions


@relax.expr_functor.mutator
class _ReadSparse(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict, cores: int):
        super().__init__(mod)
        self.plan = plan          # weight name -> {"pattern", "shape" (N, K), "arrays", ...}
        self.cores = cores
        self.weights: dict = {}
        self.params: dict = {}
        self.kernels: dict = {}

    def start(self, weights: dict) -> None:
        self.weights, self.params = weights, {}

    def added(self) -> list:
        return list(self.params.values())

    def param(self, name: str, role: str, array):
        key = f"{name}.{role}"
        if key not in self.params:
            self.params[key] = relax.Var(key, relax.TensorType(list(array.shape),
                                                               str(array.dtype)))
        return self.params[key]

    def planned(self, expr) -> str | None:
        """The pruned weight a matmul's right operand reads ([K, N]), or None."""
        if isinstance(expr, relax.Var) and expr in self.weights:
            name = self.weights[expr]
            return name if name in self.plan and self.plan[name]["stored_kn"] else None
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if isinstance(value, relax.Call) and value.op.same_as(PERMUTE) and \
                    value.args[0] in self.weights:
                name = self.weights[value.args[0]]
                return name if name in self.plan and not self.plan[name]["stored_kn"] else None
        return None

    def kernel(self, entry: dict, rows):
        n, k = entry["shape"]
        arrays = entry["arrays"]
        symbolic = not isinstance(rows, int)
        if entry["pattern"] == "bsr":
            key = ("bsr", None if symbolic else rows, n, k, entry["block"],
                   arrays["data"].shape[0])
            make = lambda: sparse.bsr_matmul_func(  # noqa: E731
                tvm.tirx.Var("m", "int64") if symbolic else rows, k, n, entry["block"],
                arrays["data"].shape[0], self.cores)
        elif entry["pattern"] == "unstructured":
            slots = arrays["values"].shape[0]
            key = ("unstructured", None if symbolic else rows, n, k, slots)
            make = lambda: sparse.unstructured_matmul_func(  # noqa: E731
                tvm.tirx.Var("m", "int64") if symbolic else rows, k, n, slots)
        else:
            p = arrays["values"].shape[2]
            key = ("p16", None if symbolic else rows, n, k, p)
            make = lambda: sparse.p16_matmul_func(  # noqa: E731
                tvm.tirx.Var("m", "int64") if symbolic else rows, k, n, p)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make(), f"{key[0]}_matmul")
        return self.kernels[key]

    def visit_call_(self, call: relax.Call):
        if not call.op.same_as(MATMUL):
            return super().visit_call_(call)
        name = self.planned(call.args[1])
        if name is None:
            return super().visit_call_(call)
        entry = self.plan[name]
        n, k = entry["shape"]
        x = self.visit_expr(call.args[0])
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape.values]
        rows = 1
        for d in shape[:-1]:
            rows = d * rows
        flat = self.builder_.emit(relax.op.reshape(x, [rows, k])) if len(shape) != 2 else x
        roles = list(entry["arrays"])
        args = [flat] + [self.param(name, role, entry["arrays"][role]) for role in roles]
        y = relax.call_tir(self.kernel(entry, rows), args, relax.TensorType([rows, n],
                                                                           "float32"))
        if len(shape) != 2:
            y = relax.op.reshape(self.builder_.emit(y), [*shape[:-1], n])
        return y


def rewrite(state, plan: dict, cores: int) -> None:
    """Rewrite every function of `state` so that the weights in `plan` are read as sparse
    arrays by sparse kernels."""
    if not plan:
        return

    def array_of(param: str):
        name, role = param.rsplit(".", 1)
        return plan[name]["arrays"][role]

    rewrite_functions(state, _ReadSparse(state.mod, plan, cores), array_of)
