"""Attention blocks in an imported Relax function, as Relax patterns (`relax.dpl`).

    out = matmul(softmax(where(mask, matmul(q, permute_dims(repeat(k), [0, 1, 3, 2])), fill)),
                 repeat(v))

`repeat` is transformers' repeat_kv (expand_dims, broadcast_to, reshape: grouped-query
attention) or nothing (as many key/value heads as query heads). graft's torch converter writes
scaled_dot_product_attention in exactly this form, with q already scaled (`multiply(q, scale)`).
Rewrites that route attention elsewhere (a fused CPU kernel, the paged KV cache) match
`ATTENTION` and read the parts through the names below.
"""

from __future__ import annotations

from tvm import tirx
from tvm.relax.dpl import is_const, is_op, wildcard

from graft.codegen.rewrites import shape_dims


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
scores = is_op("relax.matmul")(query, key_t)
masked = is_op("relax.where")(mask, scores, fill)
softmax = is_op("relax.nn.softmax")(masked)
ATTENTION = is_op("relax.matmul")(softmax, repeated_value | plain_value)


def kv_source(matches: dict, which: str):
    """The key (`which="key"`) or value tensor an ATTENTION match reads before any repeat_kv,
    and its repeat count (1 without repeat_kv); (None, None) for a repeat graft cannot read."""
    kv, repeated, plain = (key, repeated_key, plain_key) if which == "key" else \
        (value, repeated_value, plain_value)
    if repeated in matches:
        wide = shape_dims(matches[repeated.args[0]])
        axis = [int(a) for a in matches[repeated.args[0].args[0]].attrs.axis]
        if wide is None or len(wide) != 5 or axis != [2] or not isinstance(wide[2], tirx.IntImm):
            return None, None
        return matches[kv], int(wide[2])
    return matches[plain], 1


def is_key_transpose(matches: dict) -> bool:
    """Whether the match transposes the keys' last two axes and softmaxes the last one."""
    axes = matches[key_t].attrs.axes
    return axes is not None and [int(a) for a in axes] == [0, 1, 3, 2] and \
        int(matches[softmax].attrs.axis) in (-1, 3)


def cache_layer_of(source, bindings: dict, past: set) -> tuple | None:
    """(layer, new) when `source` (the keys or values an attention reads) is graft's
    causal-LM export of a cache read: concat((take(past, layer), new), axis=-2) with `past`
    one of the function's explicit cache parameters (`frontend/causal_lm.py`); else None."""
    import tvm
    from tvm import relax

    value = bindings.get(source, source)
    if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.concat"))
            and isinstance(value.args[0], relax.Tuple) and len(value.args[0].fields) == 2):
        return None
    old, new = value.args[0].fields
    old = bindings.get(old, old)
    if not (isinstance(old, relax.Call) and old.op.same_as(tvm.ir.Op.get("relax.take"))
            and any(old.args[0].same_as(p) for p in past)
            and isinstance(old.args[1], tvm.ir.expr.Constant)):
        return None
    return int(old.args[1].value.numpy()), new


def cache_reads(func) -> list[dict]:
    """Every attention of a causal-LM export function (past_k, past_v at parameters 2 and 3),
    in program order: {"layer", "keys", "values" (the concat Vars the attention reads),
    "new_keys", "new_values"}."""
    from tvm import relax

    bindings = relax.analysis.get_var2val(func)
    var_of = {value: var for var, value in bindings.items()}  # matches are the bound values
    past = {func.params[2], func.params[3]}
    found = []
    for var, value in bindings.items():
        if not ATTENTION.match(value, bindings):
            continue
        matches = ATTENTION.extract_matched_expr(value, bindings)
        (keys, _), (values, _) = kv_source(matches, "key"), kv_source(matches, "value")
        k, v = cache_layer_of(keys, bindings, past), cache_layer_of(values, bindings, past)
        if k is None or v is None or k[0] != v[0]:
            continue
        found.append({"layer": k[0], "attention": var, "keys": var_of.get(keys, keys),
                      "values": var_of.get(values, values), "new_keys": k[1],
                      "new_values": v[1]})
    return found
