"""GroupedQueryAttention: attention with fewer key/value heads than query heads reads each
key/value head once, instead of a copy per query head that shares it.

transformers' `repeat_kv` widens K and V [B, Hkv, S, D] to [B, Hkv * R, S, D] before the
products (expand_dims, broadcast_to, reshape), so every step copies the cache R times (SmolLM2:
3x, every layer, every decode step). Query head h = g * R + r reads kv head g, so splitting the
heads into [Hkv, R] lets matmul broadcast the kv head over its R query heads, reading it in
place:

    matmul(q, permute_dims(repeat(k), [0, 1, 3, 2]))                                [B, H, T, S]
      -> reshape(matmul(reshape(q, [B, Hkv, R, T, D]),
                        permute_dims(reshape(k, [B, Hkv, 1, S, D]), [0, 1, 2, 4, 3])),
                 [B, H, T, S])
    matmul(p, repeat(v))                                                            [B, H, T, D]
      -> reshape(matmul(reshape(p, [B, Hkv, R, T, S]), reshape(v, [B, Hkv, 1, S, D])),
                 [B, H, T, D])

The reshapes move no data (they become views), and a decode step's products keep one query row
each (the matrix-vector kernels). Only for a static number of query rows: with a symbolic one
(prefill), the grouped product has a batch of Hkv and symbolic rows and columns, which the Matmul
rule splits into too few tasks (measured on SmolLM2's 256-token prefill: scores and context took
3x longer than with the copy), while the copy costs little next to the product.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from graft.codegen.rewrites import provably_equal, shape_dims

kv = wildcard()
expanded = is_op("relax.expand_dims")(kv)
widened = is_op("relax.broadcast_to")(expanded, wildcard())
repeated = is_op("relax.reshape")(widened, wildcard())
transposed = is_op("relax.permute_dims")(repeated)
scores_lhs, context_lhs = wildcard(), wildcard()
SCORES = is_op("relax.matmul")(scores_lhs, transposed)
CONTEXT = is_op("relax.matmul")(context_lhs, repeated)


def _repeat_count(matches: dict) -> int | None:
    """R, when the matched reshape(broadcast_to(expand_dims(kv))) is transformers' repeat_kv:
    kv [B, Hkv, S, D] -> [B, Hkv, R, S, D] -> [B, Hkv * R, S, D]."""
    source = shape_dims(matches[kv])
    expand = matches[expanded]
    wide, flat = shape_dims(matches[widened]), shape_dims(matches[repeated])
    if source is None or wide is None or flat is None or len(source) != 4 or len(wide) != 5:
        return None
    if [int(a) for a in expand.attrs.axis] != [2] or not isinstance(wide[2], tirx.IntImm):
        return None
    count = int(wide[2])
    b, heads, seq, dim = source
    same = provably_equal
    if not (all(same(x, y) for x, y in zip([b, heads, seq, dim], [wide[0], wide[1], wide[3],
                                                                   wide[4]]))
            and len(flat) == 4 and same(flat[1], heads * count)
            and all(same(x, y) for x, y in zip([b, seq, dim], [flat[0], flat[2], flat[3]]))):
        return None
    return count


def _grouped(call: relax.Call, matches: dict, lhs_pattern, rhs_of) -> relax.Expr:
    count = _repeat_count(matches)
    lhs, out = shape_dims(matches[lhs_pattern]), shape_dims(call)
    if count is None or count == 1 or lhs is None or out is None or len(lhs) != 4:
        return call
    if not isinstance(lhs[2], tirx.IntImm):
        return call  # a symbolic number of query rows (prefill): see the module docstring
    b, heads, seq, dim = shape_dims(matches[kv])
    if not (provably_equal(lhs[0], b) and provably_equal(lhs[1], heads * count)):
        return call
    split = relax.op.reshape(matches[lhs_pattern], [b, heads, count, lhs[2], lhs[3]])
    shared = relax.op.reshape(matches[kv], [b, heads, 1, seq, dim])
    product = relax.op.matmul(split, rhs_of(shared), out_dtype=call.attrs.out_dtype)
    return relax.op.reshape(product, out)


def _scores(call: relax.Call, matches: dict) -> relax.Expr:
    axes = matches[transposed].attrs.axes
    if axes is None or [int(a) for a in axes] != [0, 1, 3, 2]:
        return call
    return _grouped(call, matches, scores_lhs,
                    lambda k: relax.op.permute_dims(k, [0, 1, 2, 4, 3]))


def _context(call: relax.Call, matches: dict) -> relax.Expr:
    return _grouped(call, matches, context_lhs, lambda v: v)


RULES = [(SCORES, _scores), (CONTEXT, _context)]


@tvm.transform.module_pass(opt_level=0, name="GroupedQueryAttention")
class GroupedQueryAttention:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mod.clone()
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                for pattern, rewrite in RULES:
                    func = rewrite_call(pattern, rewrite, func)
                mod[gv] = relax.analysis.remove_all_unused(func)
        return mod
