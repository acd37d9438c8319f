"""The ONNX Attention op (opset 23+), which TVM's importer does not have: its `Attention`
converter is onnxruntime's com.microsoft contrib op (packed QKV weights, `num_heads`), and a
node of that form still goes to it.

The computation follows the ONNX reference (onnx/reference/ops/op_attention.py) step by step:
3-D inputs split into heads; `sqrt(scale)` multiplied into both Q and K; past K/V concatenated
in front (present_key/present_value are the concatenation, before grouped heads are
repeated); an additive bias built from attn_mask (bool masks as 0/-inf, padded with -inf to
the key length), the bottom-right aligned causal mask, the sliding window and the
nonpad_kv_seqlen padding; softcap before the bias; softmax in `softmax_precision`, with a
row that every key is masked from giving zeros rather than NaN.
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_extra_ops import HALF_TYPES, matmul
from graft.frontend.onnx_runtime_shapes import optional_input

_QK_WITH_BIAS = 2
_QK_AFTER_SOFTMAX = 3


def _const(value, dtype):
    """A scalar of any float dtype (numpy has no bfloat16)."""
    if dtype == "bfloat16":
        return relax.op.astype(relax.const(value, "float32"), dtype)
    return relax.const(value, dtype)


def _split_heads(bb, x, num_heads):
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    batch, seq, hidden = x.ty.shape.values
    return bb.normalize(relax.op.permute_dims(
        relax.op.reshape(x, [batch, seq, num_heads, tirx.floordiv(hidden, num_heads)]),
        [0, 2, 1, 3]))


def _positions(start, length):
    return relax.op.arange(start, start + length, 1, "int64")


def _additive(allowed, dtype):
    return relax.op.where(allowed, _const(0.0, dtype), _const(-np.inf, dtype))


def _static(expr):
    """The int value of a shape expression, or None where it is known only at run time."""
    expr = tvm.sym.Analyzer().simplify(expr)
    return int(expr) if isinstance(expr, tirx.IntImm) else None


class Attention(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "num_heads" in attr:  # com.microsoft.Attention
            return tvm_onnx.Attention._impl_v1(bb, inputs, attr, params)
        return _attention(bb, inputs, attr)


def _attention(bb, inputs, attr):
    query, key, value = (bb.normalize(inputs[i]) for i in range(3))
    optional = [None if optional_input(inputs, i) is None else bb.normalize(inputs[i])
                for i in range(3, 7)]
    mask, past_key, past_value, nonpad_kv_seqlen = optional
    dtype = str(query.ty.dtype)
    is_causal = bool(attr.get("is_causal", 0))
    softcap = float(attr.get("softcap", 0.0))
    mode = int(attr.get("qk_matmul_output_mode", 0))
    left_window, right_window = (int(attr.get(k, -1)) for k in ("left_window_size",
                                                                 "right_window_size"))
    rank = query.ty.ndim
    if rank == 3:
        q_heads, kv_heads = attr.get("q_num_heads"), attr.get("kv_num_heads")
        if q_heads is None or kv_heads is None:
            raise ValueError("Attention with 3-D inputs needs q_num_heads and kv_num_heads")
        query = _split_heads(bb, query, q_heads)
        key = _split_heads(bb, key, kv_heads)
        value = _split_heads(bb, value, kv_heads)
    elif rank != 4:
        raise ValueError(f"Attention takes 3-D or 4-D Q, K, V; Q has rank {rank}")
    batch, q_heads, q_len, head_size = query.ty.shape.values
    scale = attr.get("scale")
    if scale is None:
        if not isinstance(head_size, tirx.IntImm):
            raise NotImplementedError("Attention without `scale` on a run-time head size")
        scale = 1.0 / np.sqrt(int(head_size))
    root_scale = _const(float(np.sqrt(scale)), dtype)

    past_len = 0
    if past_key is not None:
        past_len = past_key.ty.shape.values[2]
        key = bb.normalize(relax.op.concat([past_key, key], axis=2))
        value = bb.normalize(relax.op.concat([past_value, value], axis=2))
    present_key, present_value = key, value
    kv_len = key.ty.shape.values[2]

    bias = None  # additive [.., q, kv], or None where nothing is masked
    if mask is not None:
        mask_len = mask.ty.shape.values[-1]
        missing = _static(kv_len - mask_len)
        if missing is None:  # a length of its own: taken to cover every key (checked per call)
            mask = bb.match_cast(mask, relax.TensorType(
                list(mask.ty.shape.values[:-1]) + [kv_len], mask.ty.dtype))
        elif missing > 0:
            fill_shape = list(mask.ty.shape.values[:-1]) + [missing]
            fill = relax.op.broadcast_to(relax.const(False) if str(mask.ty.dtype) == "bool"
                                         else _const(-np.inf, str(mask.ty.dtype)), fill_shape)
            mask = bb.normalize(relax.op.concat([mask, fill], axis=-1))
        bias = (_additive(mask, dtype) if str(mask.ty.dtype) == "bool" else
                mask if str(mask.ty.dtype) == dtype else relax.op.astype(mask, dtype))

    if nonpad_kv_seqlen is not None:
        nonpad_kv_seqlen = bb.normalize(relax.op.astype(nonpad_kv_seqlen, "int64"))
    if past_key is None and nonpad_kv_seqlen is not None:
        # the query block ends at each batch's last valid key: offset = nonpad - q_len
        query_at = relax.op.add(relax.op.reshape(_positions(-q_len, q_len), [q_len, 1]),
                                relax.op.reshape(nonpad_kv_seqlen, [-1, 1, 1]))
        per_batch = True
    else:
        query_at = relax.op.reshape(_positions(past_len, q_len), [q_len, 1])
        per_batch = False
    key_at = relax.op.reshape(_positions(0, kv_len), [1, kv_len])

    def add_bias(allowed):
        nonlocal bias
        extra = _additive(allowed, dtype)
        if per_batch:
            extra = relax.op.expand_dims(extra, 1)
        bias = extra if bias is None else relax.op.add(bias, extra)

    if is_causal:
        add_bias(relax.op.less_equal(key_at, query_at))
    if left_window >= 0 or right_window >= 0:
        distance = relax.op.subtract(query_at, key_at)
        allowed = None
        if left_window >= 0:
            allowed = relax.op.less_equal(distance, relax.const(left_window, "int64"))
        if right_window >= 0:
            right = relax.op.less_equal(relax.op.negative(distance),
                                        relax.const(right_window, "int64"))
            allowed = right if allowed is None else relax.op.logical_and(allowed, right)
        add_bias(allowed)
    if nonpad_kv_seqlen is not None:
        valid = relax.op.less(relax.op.reshape(_positions(0, kv_len), [1, kv_len]),
                              relax.op.reshape(nonpad_kv_seqlen, [-1, 1]))
        padding = relax.op.reshape(_additive(valid, dtype), [batch, 1, 1, kv_len])
        bias = padding if bias is None else relax.op.add(bias, padding)
    if bias is not None:
        bias = bb.normalize(bias)

    kv_heads = key.ty.shape.values[1]
    if not isinstance(q_heads, tirx.IntImm) or not isinstance(kv_heads, tirx.IntImm):
        raise NotImplementedError("Attention with a run-time number of heads")
    if int(q_heads) != int(kv_heads):
        if int(q_heads) % int(kv_heads):
            raise ValueError(f"Attention: {int(q_heads)} query heads are not a multiple of "
                             f"{int(kv_heads)} key/value heads")
        repeats = int(q_heads) // int(kv_heads)
        key = relax.op.repeat(key, repeats, axis=1)
        value = relax.op.repeat(value, repeats, axis=1)

    scores = matmul(relax.op.multiply(query, root_scale), relax.op.permute_dims(
        relax.op.multiply(key, root_scale), [0, 1, 3, 2]), dtype)
    if softcap > 0:
        cap = _const(softcap, dtype)
        scores = relax.op.multiply(relax.op.tanh(relax.op.divide(scores, cap)), cap)
    scores = bb.normalize(scores)
    with_bias = scores if bias is None else bb.normalize(relax.op.add(scores, bias))
    qk_output = with_bias if mode == _QK_WITH_BIAS else scores

    softmax_dtype = dtype
    if attr.get("softmax_precision") is not None:
        softmax_dtype = str(onnx.helper.tensor_dtype_to_np_dtype(attr["softmax_precision"]))
        softmax_dtype = "bfloat16" if "bfloat16" in softmax_dtype else softmax_dtype
    logits = with_bias if softmax_dtype == dtype else relax.op.astype(with_bias, softmax_dtype)
    # a causal mask alone leaves every query row a key (the first): no row to guard
    may_mask_a_row = (mask is not None or nonpad_kv_seqlen is not None or left_window >= 0
                      or right_window >= 0)
    if not may_mask_a_row and softmax_dtype not in HALF_TYPES:
        probs = relax.op.nn.softmax(logits, axis=-1)
    else:
        probs = _masked_softmax(bb, logits, bias if may_mask_a_row else None, softmax_dtype)
    probs = bb.normalize(probs)
    if mode == _QK_AFTER_SOFTMAX:
        qk_output = probs
    if softmax_dtype != dtype:
        probs = relax.op.astype(probs, dtype)
    output = matmul(probs, value, dtype)
    if rank == 3:
        output = bb.normalize(relax.op.permute_dims(output, [0, 2, 1, 3]))
        shape = output.ty.shape.values
        output = relax.op.reshape(output, [shape[0], shape[1], shape[2] * shape[3]])
    outputs = [output, present_key, present_value,
               qk_output if str(qk_output.ty.dtype) == dtype else relax.op.astype(qk_output, dtype)]
    return relax.Tuple(outputs[:attr["tvm_custom"]["num_outputs"]])


def _masked_softmax(bb, logits, bias, dtype):
    """Softmax where a row of all -inf gives zeros (not NaN), as does a row whose bias is all
    -inf even where its logits are not (NaN or +inf scores under a full mask). Without a bias
    it is the plain softmax, written out so a half-precision sum accumulates in float32."""
    zero, one = _const(0.0, dtype), _const(1.0, dtype)
    row_max = relax.op.max(logits, axis=-1, keepdims=True)
    row_max = relax.op.where(relax.op.equal(row_max, _const(-np.inf, dtype)), zero, row_max)
    exp = bb.normalize(relax.op.exp(relax.op.subtract(logits, row_max)))
    total = (relax.op.sum(exp, axis=-1, keepdims=True) if dtype not in HALF_TYPES else
             relax.op.astype(relax.op.sum(relax.op.astype(exp, "float32"), axis=-1,
                                          keepdims=True), dtype))
    total = relax.op.where(relax.op.equal(total, zero), one, total)
    probs = relax.op.divide(exp, total)
    if bias is None:
        return probs
    bias_max = relax.op.max(bias, axis=-1, keepdims=True)
    all_masked = relax.op.equal(bias_max, _const(-np.inf, str(bias.ty.dtype)))
    return relax.op.where(all_masked, zero, probs)


CONVERTERS = {"Attention": Attention}
