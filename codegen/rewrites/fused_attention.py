"""FusedAttention: masked attention runs as one kernel.

    out = matmul(softmax(where(mask, matmul(q, permute_dims(repeat(k), [0, 1, 3, 2])), lowest)),
                 repeat(v))
      -> out = call_tir(attention, (q, k, v, mask))

The pattern is `graft.ir.attention.ATTENTION` (`repeat` is transformers' repeat_kv, or
nothing); `lowest` is a constant no greater than -1e30 (masked scores weigh nothing). The
kernels (`codegen/cpu/attention.py`) never store the scores of a whole sequence and read each
key/value head in place for its query heads: a symbolic or large number of queries (prefill,
an encoder) gets the flash-style kernel, which also skips key blocks the mask hides from all of
a task's rows; a static few (below MIN_QUERIES: a decode step) get the decode kernel, one task
per key/value head. float32, CPU only. GroupedQueryAttention handles what is left.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from graft.codegen.cpu.attention import LANES, attention_func, decode_attention_func
from graft.codegen.rewrites import mutate_relax_functions, provably_equal, shape_dims
from graft.ir.attention import ATTENTION, is_key_transpose, kv_source, mask, masked, query

LOWEST_MASK_FILL = -1e30
MIN_QUERIES = 8  # fewer (static) query rows: the decode kernel
MAX_DECODE_ROWS = 16  # query rows per key/value head the decode kernel holds in registers


def _attention_shapes(call: relax.Call, matches: dict):
    """(q, k, v, heads, kv_heads, dim) when the matched attention fits the kernel, else None."""
    k, k_count = kv_source(matches, "key")
    v, v_count = kv_source(matches, "value")
    q = matches[query]
    if k is None or v is None or k_count != v_count:
        return None
    dims = [shape_dims(x) for x in (q, k, v, matches[mask])]
    if any(d is None or len(d) != 4 for d in dims):
        return None
    (b, heads, n, dim), (kb, kv_heads, t, kdim), vdims, mdims = dims
    if not (isinstance(heads, tirx.IntImm) and isinstance(kv_heads, tirx.IntImm)
            and isinstance(dim, tirx.IntImm)):
        return None
    if isinstance(n, tirx.IntImm) and int(n) < MIN_QUERIES and \
            int(n) * int(heads) // int(kv_heads) > MAX_DECODE_ROWS:
        return None
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
    if not is_key_transpose(matches):
        return None
    tensors = (q, k, v, matches[masked].args[1], call)
    if any(str(x.ty.dtype) != "float32" for x in tensors) or \
            str(matches[mask].ty.dtype) != "bool":
        return None
    fill_value = matches[masked.args[2]].value.numpy()
    if fill_value.ndim != 0 or float(fill_value) > LOWEST_MASK_FILL:
        return None
    return q, k, v, int(heads), int(kv_heads), int(dim)


@relax.expr_functor.mutator
class _Attention(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict = {}
        self.bindings: dict = {}
        self.var_of: dict = {}

    def visit_function_(self, func: relax.Function):
        self.bindings = relax.analysis.get_var2val(func)
        self.var_of = {value: var for var, value in self.bindings.items()}
        return super().visit_function_(func)

    def operand(self, matched: relax.Expr) -> relax.Expr:
        """A matched tensor as the variable bound to it (matches are the bound values: passed
        as they are, the call would compute them a second time)."""
        return self.visit_expr(self.var_of.get(matched, matched))

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not ATTENTION.match(call, self.bindings):
            return call
        matches = ATTENTION.extract_matched_expr(call, self.bindings)
        found = _attention_shapes(call, matches)
        if found is None:
            return call
        q, k, v, heads, kv_heads, dim = found
        b, _, n, _ = shape_dims(q)
        queries = int(n) if isinstance(n, tirx.IntImm) and int(n) < MIN_QUERIES else None
        key = (heads, kv_heads, dim, queries)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(
                attention_func(heads, kv_heads, dim) if queries is None else
                decode_attention_func(heads, kv_heads, dim, queries),
                f"attention_{heads}x{kv_heads}x{dim}" if queries is None else
                f"decode_attention_{heads}x{kv_heads}x{dim}x{queries}")
        operands = [self.operand(x) for x in (q, k, v, matches[mask])]
        return relax.call_tir(self.kernels[key], operands,
                              relax.TensorType([b, heads, n, dim], "float32"))


@tvm.transform.module_pass(opt_level=0, name="FusedAttention")
class FusedAttention:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mutate_relax_functions(_Attention(mod), mod)
        return relax.transform.DeadCodeElimination()(mod)
