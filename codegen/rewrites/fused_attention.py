"""FusedAttention: masked attention over a symbolic number of queries runs as one kernel.

    out = matmul(softmax(where(mask, matmul(q, permute_dims(repeat(k), [0, 1, 3, 2])), lowest)),
                 repeat(v))
      -> out = call_tir(attention, (q, k, v, mask))

`repeat` is transformers' repeat_kv (expand_dims, broadcast_to, reshape; see
`grouped_attention.py`) or nothing (as many key/value heads as query heads); `lowest` is a
constant no greater than -1e30 (masked scores weigh nothing). The kernel
(`codegen/cpu/attention.py`) never stores the scores, skips key blocks the mask hides from all
of a task's rows, and reads each key/value head in place for its query heads. Only for a
symbolic number of queries (prefill; a decode step's one row keeps GroupedQueryAttention's
products) and float32. CPU only.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_const, is_op, wildcard

from graft.codegen.cpu.attention import LANES, attention_func
from graft.codegen.rewrites import mutate_relax_functions, provably_equal, shape_dims

LOWEST_MASK_FILL = -1e30


def _repeat_kv():
    kv = wildcard()
    repeated = is_op("relax.reshape")(
        is_op("relax.broadcast_to")(is_op("relax.expand_dims")(kv), wildcard()), wildcard())
    return kv, repeated


key, repeated_key = _repeat_kv()
value, repeated_value = _repeat_kv()
plain_key, plain_value, query, mask, fill = wildcard(), wildcard(), wildcard(), wildcard(), \
    is_const()
key_t = is_op("relax.permute_dims")(repeated_key | plain_key)
masked = is_op("relax.where")(mask, is_op("relax.matmul")(query, key_t), fill)
softmax = is_op("relax.nn.softmax")(masked)
ATTENTION = is_op("relax.matmul")(softmax, repeated_value | plain_value)


def _source(matches: dict, kv, repeated, plain):
    """The key (or value) tensor before any repeat_kv, and its repeat count."""
    if repeated in matches:
        wide = shape_dims(matches[repeated.args[0]])
        axis = [int(a) for a in matches[repeated.args[0].args[0]].attrs.axis]
        if wide is None or len(wide) != 5 or axis != [2] or not isinstance(wide[2], tirx.IntImm):
            return None, None
        return matches[kv], int(wide[2])
    return matches[plain], 1


def _attention_shapes(call: relax.Call, matches: dict):
    """(q, k, v, heads, kv_heads, dim) when the matched attention fits the kernel, else None."""
    k, k_count = _source(matches, key, repeated_key, plain_key)
    v, v_count = _source(matches, value, repeated_value, plain_value)
    q = matches[query]
    if k is None or v is None or k_count != v_count:
        return None
    dims = [shape_dims(x) for x in (q, k, v, matches[mask])]
    if any(d is None or len(d) != 4 for d in dims):
        return None
    (b, heads, n, dim), (kb, kv_heads, t, kdim), vdims, mdims = dims
    if not (isinstance(heads, tirx.IntImm) and isinstance(kv_heads, tirx.IntImm)
            and isinstance(dim, tirx.IntImm)) or isinstance(n, tirx.IntImm):
        return None  # a static number of queries (a decode step) keeps the products
    if int(heads) != int(kv_heads) * k_count or int(dim) % LANES:
        return None
    # v's length may be a symbol of its own (transformers' export gives the past keys and
    # values separate lengths): the kernel takes both as one length, which TVM checks when
    # the kernel is called
    same = provably_equal
    if not (same(b, kb) and same(dim, kdim)
            and all(same(x, y) for x, y in zip([kb, kv_heads, kdim], vdims[:2] + vdims[3:]))
            and same(mdims[2], n) and same(mdims[3], t)
            and any(same(mdims[0], x) for x in (1, b))
            and any(same(mdims[1], x) for x in (1, heads))):
        return None
    axes = matches[key_t].attrs.axes
    if axes is None or [int(a) for a in axes] != [0, 1, 3, 2] or \
            int(matches[softmax].attrs.axis) not in (-1, 3):
        return None
    tensors = (q, k, v, matches[masked].args[1], call)
    if any(str(x.ty.dtype) != "float32" for x in tensors) or \
            str(matches[mask].ty.dtype) != "bool":
        return None
    fill_value = matches[fill].value.numpy()
    if fill_value.ndim != 0 or float(fill_value) > LOWEST_MASK_FILL:
        return None
    return q, k, v, int(heads), int(kv_heads), int(dim)


@relax.expr_functor.mutator
class _Attention(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict = {}
        self.bindings: dict = {}

    def visit_function_(self, func: relax.Function):
        self.bindings = relax.analysis.get_var2val(func)
        return super().visit_function_(func)

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not ATTENTION.match(call, self.bindings):
            return call
        matches = ATTENTION.extract_matched_expr(call, self.bindings)
        found = _attention_shapes(call, matches)
        if found is None:
            return call
        q, k, v, heads, kv_heads, dim = found
        if (heads, kv_heads, dim) not in self.kernels:
            self.kernels[heads, kv_heads, dim] = self.builder_.add_func(
                attention_func(heads, kv_heads, dim), f"attention_{heads}x{kv_heads}x{dim}")
        b, _, n, _ = shape_dims(q)
        return relax.call_tir(self.kernels[heads, kv_heads, dim], [q, k, v, matches[mask]],
                              relax.TensorType([b, heads, n, dim], "float32"))


@tvm.transform.module_pass(opt_level=0, name="FusedAttention")
class FusedAttention:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mutate_relax_functions(_Attention(mod), mod)
        return relax.transform.DeadCodeElimination()(mod)
