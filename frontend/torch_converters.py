"""graft's own converters for torch ops that TVM's importer lacks or gets wrong.

With these, most exported programs import as torch.export wrote them, without
`run_decompositions()`: that retrace costs 40 s on SmolLM2-135M, half of its compile time.

- `to.device` (written by transformers for masks and rotary tables): TVM has no converter.
  On CPU it is a no-op, or a cast when a dtype is given.
- `new_ones` / `new_zeros`: TVM's converters ignore the `dtype` argument (transformers builds
  its boolean masks with `x.new_ones(shape, dtype=torch.bool)`).
- `where` with a Python number for either branch (`torch.where(mask, 0.0, -1e4)`): TVM has
  only the all-tensor form.
- `slice.Tensor` `x[:, :n]` with a symbolic n that torch proved in bounds (`position_ids[:, :seq]`
  on a 512-entry buffer with seq <= 512): TVM gives the result the length `min(n, 512)`, so
  adding it to a tensor of length n loses the shape and a later `view(..., -1)` fails. When
  torch's own output length is n, the slice is emitted with `assume_inbound=True`; likewise
  `x[:, -k:]` (transformers' `logits_to_keep`), whose length TVM cannot simplify to k.
- `batch_norm.default` (what torch.export writes for a BatchNorm layer without decompositions):
  TVM reads its arguments as `_native_batch_norm_legit`'s (training, momentum, eps shifted by
  one), so an eval-mode BatchNorm ran with batch statistics and eps 0.1. This reads
  (input, weight, bias, running_mean, running_var, training, momentum, eps) as torch does.
- `scaled_dot_product_attention`: TVM's converter accepts only float masks and emits
  `nn.attention`, which no graft schedule rule covers. This emits the math form, like
  PyTorch's reference, as matmuls and a softmax that the CPU rules schedule: the scale is
  applied to the queries, a boolean mask selects the most negative float (so a fully masked
  row gives a uniform row, not NaN), a float mask is added, `is_causal` masks top-left
  aligned, and `enable_gqa` repeats key/value heads as `repeat_interleave` does.
- `amax` / `amin`: TVM has no converter.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from tvm import relax

from graft.runtime.errors import GraftError


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def to_device(node, importer):
    x = importer.env[node.args[0]]
    dtype = _arg(node, 2, "dtype")
    if dtype is None:
        return x
    target = importer._convert_data_type(dtype, importer.env)
    if str(target) == str(x.ty.dtype):
        return x
    return importer.block_builder.emit(relax.op.astype(x, target))


def _new_filled(fill_value):
    def convert(node, importer):
        like = importer.env[node.args[0]]
        size = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        size = relax.ShapeExpr([importer._retrieve_args(d) for d in size])
        dtype = node.kwargs.get("dtype")
        dtype = importer._convert_data_type(dtype, importer.env) if dtype else like.ty.dtype
        return importer.block_builder.emit(
            relax.op.full(size, relax.const(fill_value, str(dtype)), str(dtype)))
    return convert


def where_with_scalars(node, importer):
    dtype = str(node.meta["val"].dtype).replace("torch.", "")

    def operand(arg):
        return importer.env[arg] if hasattr(arg, "meta") else relax.const(arg, dtype)

    condition, x, y = (operand(a) for a in node.args[:3])
    return importer.block_builder.emit(relax.op.where(condition, x, y))


def _reduce_extreme(reduce):
    """amax / amin (missing from TVM's importer): dim is an int, a list, or empty for all."""
    def convert(node, importer):
        x = importer.env[node.args[0]]
        dim = _arg(node, 1, "dim", [])
        dim = [dim] if isinstance(dim, int) else list(dim)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        return importer.block_builder.emit(reduce(x, dim or None, keepdim))
    return convert


def slice_tensor(node, importer):
    dim = _arg(node, 1, "dim", 0)
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    out = getattr(node.meta.get("val"), "shape", None)
    x = importer.env[node.args[0]]
    if step != 1 or out is None or x.ty.shape is None:
        return importer._slice(node)
    dim = dim % x.ty.ndim
    length = x.ty.shape[dim]
    open_end = end is None or (isinstance(end, int) and end >= sys.maxsize)
    if start in (None, 0) and hasattr(end, "meta") \
            and _same_symbol(out[dim], end.meta.get("val")):
        begin, end = 0, importer.env[end]  # x[:, :n], n <= len(x) proved by torch
    elif isinstance(start, int) and start < 0 and open_end and isinstance(out[dim], int) \
            and out[dim] == -start:
        begin, end = length + start, length  # x[:, -k:], len(x) >= k proved by torch
    else:
        return importer._slice(node)
    return importer.block_builder.emit(
        relax.op.strided_slice(x, [dim], [begin], [end], assume_inbound=True))


def _same_symbol(a, b) -> bool:
    import torch

    return (isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt)
            and a.node.expr == b.node.expr)


def batch_norm(node, importer):
    x = importer.env[node.args[0]]
    channels = int(importer.shape_of(x)[1])
    dtype = str(x.ty.dtype)

    def operand(index, name, fill):
        arg = _arg(node, index, name)
        return importer.env[arg] if arg is not None else relax.const(np.full(channels, fill,
                                                                             dtype))

    weight, bias = operand(1, "weight", 1.0), operand(2, "bias", 0.0)
    mean, var = operand(3, "running_mean", 0.0), operand(4, "running_var", 1.0)
    training = bool(_arg(node, 5, "training", False))
    momentum = float(_arg(node, 6, "momentum", 0.1) or 0.1)
    eps = float(_arg(node, 7, "eps", 1e-5))
    out = importer.block_builder.emit(relax.op.nn.batch_norm(
        x, weight, bias, mean, var, axis=1, epsilon=eps, center=True, scale=True,
        momentum=momentum, training=training))
    return importer.block_builder.emit(relax.TupleGetItem(out, 0))


def scaled_dot_product_attention(node, importer):
    emit = importer.block_builder.emit
    query, key, value = (importer.env[a] for a in node.args[:3])
    attn_mask = _arg(node, 3, "attn_mask")
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    is_causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale")
    enable_gqa = node.kwargs.get("enable_gqa", False)
    if dropout_p:
        raise GraftError(f"scaled_dot_product_attention node {node.name!r}: dropout_p="
                         f"{dropout_p} is a training-time op; export the model in eval mode")
    shape, dtype = query.ty.shape, str(query.ty.dtype)
    rank = len(shape)
    if scale is None:
        scale = 1.0 / math.sqrt(int(shape[-1]))
    if enable_gqa:
        key, value = (_repeat_heads(emit, t, shape[-3]) for t in (key, value))

    query = emit(relax.op.multiply(query, relax.const(scale, dtype)))
    axes = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = emit(relax.op.matmul(query, emit(relax.op.permute_dims(key, axes))))
    lowest = relax.const(_lowest(dtype), dtype)
    if is_causal:
        rows = emit(relax.op.expand_dims(emit(relax.op.arange(0, shape[-2], 1, "int64")), 1))
        cols = emit(relax.op.arange(0, key.ty.shape[-2], 1, "int64"))
        scores = emit(relax.op.where(emit(relax.op.less_equal(cols, rows)), scores, lowest))
    if attn_mask is not None:
        mask = importer.env[attn_mask]
        if mask.ty.dtype == "bool":
            scores = emit(relax.op.where(mask, scores, lowest))
        else:
            scores = emit(relax.op.add(scores, mask))
    weights = emit(relax.op.nn.softmax(scores, axis=-1))
    return emit(relax.op.matmul(weights, value))


def _repeat_heads(emit, tensor, query_heads):
    """[..., Hk, S, D] -> [..., Hq, S, D], each key/value head repeated Hq/Hk times in place."""
    shape = list(tensor.ty.shape)
    heads = shape[-3]
    if int(heads) == int(query_heads):
        return tensor
    repeats = int(query_heads) // int(heads)
    expanded = emit(relax.op.expand_dims(tensor, len(shape) - 2))
    spread = shape[:-2] + [repeats] + shape[-2:]
    expanded = emit(relax.op.broadcast_to(expanded, spread))
    return emit(relax.op.reshape(expanded, shape[:-3] + [query_heads] + shape[-2:]))


def _lowest(dtype: str) -> float:
    return float(np.finfo("float32" if dtype == "bfloat16" else dtype).min)


CONVERTERS = {
    "to.device": to_device,
    "new_ones.default": _new_filled(1),
    "new_zeros.default": _new_filled(0),
    "slice.Tensor": slice_tensor,
    "where.Scalar": where_with_scalars,
    "where.ScalarSelf": where_with_scalars,
    "where.ScalarOther": where_with_scalars,
    "scaled_dot_product_attention.default": scaled_dot_product_attention,
    "batch_norm.default": batch_norm,
    "amax.default": _reduce_extreme(relax.op.max),
    "amin.default": _reduce_extreme(relax.op.min),
}
