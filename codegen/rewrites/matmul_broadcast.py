"""MatmulBroadcastWeight: `matmul(x, broadcast_to(W, [..., K, N]))` becomes `matmul(x, W)`.

torch.export writes some projections this way (BERT's attention output); once constant-folded
or legalized, the broadcast materializes a batch-sized copy of W on every call. matmul broadcasts
its operands itself, so the copy is dropped when x already has every leading dimension the
broadcast adds and W's last two dimensions are the broadcast's last two.
"""

from __future__ import annotations

import tvm
from tvm_ffi import structural_equal
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from graft.codegen.rewrites import shape_dims

x = wildcard()
weight = wildcard()
target_shape = wildcard()
PATTERN = is_op("relax.matmul")(x, is_op("relax.broadcast_to")(weight, target_shape))


def _rewrite(call: relax.Call, matches: dict) -> relax.Expr:
    lhs, w = shape_dims(matches[x]), shape_dims(matches[weight])
    broadcast = shape_dims(call.args[1])
    if lhs is None or w is None or broadcast is None or len(w) < 2:
        return call
    def same(dims_a, dims_b):
        return len(dims_a) == len(dims_b) and all(
            structural_equal(a, b) for a, b in zip(dims_a, dims_b))

    same_matrix = same(w[-2:], broadcast[-2:]) and same(lhs[:-2], broadcast[:-2])
    leading_ones = all(isinstance(d, tvm.tirx.IntImm) and d.value == 1 for d in w[:-2])
    if not (same_matrix and leading_ones):
        return call
    matrix = matches[weight]
    if len(w) > 2:
        matrix = relax.op.reshape(matrix, w[-2:])
    return relax.op.matmul(matches[x], matrix, out_dtype=call.attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="MatmulBroadcastWeight")
class MatmulBroadcastWeight:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mod.clone()
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewrite_call(PATTERN, _rewrite, func)
        return mod
