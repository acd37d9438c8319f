"""ONNX ops TVM's importer lacks, most of them from opsets 23-28: RotaryEmbedding, SwiGLU,
Swish, TensorScatter (a KV-cache write), BitCast, CumProd; and the older Celu and
ReverseSequence, and Elu of float16 (TVM's fails). Each follows onnx.reference's implementation.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx, topi
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import constant_values, dim_tensor, optional_input


class Swish(tvm_onnx.OnnxOpConverter):
    """x * sigmoid(alpha * x)."""

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        return swish(bb, inputs[0], attr.get("alpha", 1.0))


def swish(bb, x, alpha):
    x = bb.normalize(x)
    scaled = relax.op.multiply(x, relax.const(alpha, str(x.ty.dtype))) if alpha != 1.0 else x
    return relax.op.multiply(x, relax.op.sigmoid(scaled))


class SwiGLU(tvm_onnx.OnnxOpConverter):
    """Swish_alpha(a) * b."""

    @classmethod
    def _impl_v28(cls, bb, inputs, attr, params):
        return relax.op.multiply(swish(bb, inputs[0], attr.get("alpha", 1.0)), inputs[1])


class Celu(tvm_onnx.OnnxOpConverter):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        dtype = str(x.ty.dtype)
        alpha = relax.const(attr.get("alpha", 1.0), dtype)
        zero, one = relax.const(0.0, dtype), relax.const(1.0, dtype)
        negative = relax.op.multiply(alpha, relax.op.subtract(
            relax.op.exp(relax.op.divide(x, alpha)), one))
        return relax.op.add(relax.op.maximum(x, zero), relax.op.minimum(negative, zero))


class Elu(tvm_onnx.OnnxOpConverter):
    """x where x >= 0, else alpha * (exp(x) - 1), in x's type (TVM's converter mixes a
    float32 constant into float16 inputs and fails)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        dtype = str(x.ty.dtype)
        negative = relax.op.multiply(relax.const(attr.get("alpha", 1.0), dtype), relax.op.subtract(
            relax.op.exp(x), relax.const(1.0, dtype)))
        return relax.op.where(relax.op.less(x, relax.const(0.0, dtype)), negative, x)


class BitCast(tvm_onnx.OnnxOpConverter):
    """The same bits read as another type of the same width."""

    @classmethod
    def _impl_v26(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        target = str(tvm_onnx.get_type(attr["to"]))
        source = str(x.ty.dtype)
        if np.dtype(target).itemsize != np.dtype(source).itemsize:
            raise ValueError(f"BitCast from {source} to {target}: the widths differ")
        if source == "bool" or target == "bool":  # bool is one byte in memory, 1 bit in TIR
            via = relax.op.astype(x, "uint8") if source == "bool" else x
            if target == "bool":
                return relax.op.not_equal(via, relax.const(0, str(via.ty.dtype)))
            return relax.op.astype(via, target) if target != "uint8" else via
        return bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tirx.reinterpret(
            target, t(*i)), name="bitcast"), x, primfunc_name_hint="bitcast")


class CumProd(tvm_onnx.OnnxOpConverter):
    """Running product along an axis (constant or given at run time), exclusive and reversed
    as the attributes say."""

    @classmethod
    def _impl_v26(cls, bb, inputs, attr, params):
        data = bb.normalize(inputs[0])
        rank = data.ty.ndim
        exclusive, reverse = bool(attr.get("exclusive", 0)), bool(attr.get("reverse", 0))
        known = constant_values(inputs[1], params)
        if known is not None:
            return _running_product(bb, data, int(np.asarray(known).reshape(())) % rank,
                                    exclusive, reverse)
        axis = bb.normalize(relax.op.reshape(relax.op.astype(inputs[1], "int64"), []))
        axis = bb.normalize(relax.op.where(relax.op.less(axis, relax.const(0, "int64")),
                                           relax.op.add(axis, relax.const(rank, "int64")), axis))
        result = None
        for k in range(rank):
            along_k = _running_product(bb, data, k, exclusive, reverse)
            result = along_k if result is None else bb.normalize(relax.op.where(
                relax.op.equal(axis, relax.const(k, "int64")), along_k, result))
        return result


def _running_product(bb, data, axis, exclusive, reverse):
    if reverse:
        data = bb.emit_te(topi.flip, data, axis=axis)
    data = bb.normalize(relax.op.cumprod(data, axis, exclusive=exclusive))
    if reverse:
        data = bb.emit_te(topi.flip, data, axis=axis)
    return data


class ReverseSequence(tvm_onnx.OnnxOpConverter):
    """Each batch entry's first sequence_lens[b] steps along the time axis reversed; the
    rest kept: position t reads t' = len - 1 - t where t < len, else t."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        data = bb.normalize(inputs[0])
        rank = data.ty.ndim
        batch_axis, time_axis = attr.get("batch_axis", 1), attr.get("time_axis", 0)
        int64 = "int64"
        lengths = bb.normalize(relax.op.astype(inputs[1], int64))
        steps = data.ty.shape.values[time_axis]
        position = bb.normalize(relax.op.arange(0, steps, 1, int64))
        batch_major = batch_axis < time_axis  # the (batch, time) plane as [B, T] or [T, B]
        lengths_at = relax.op.reshape(lengths, [-1, 1] if batch_major else [1, -1])
        position_at = relax.op.reshape(position, [1, -1] if batch_major else [-1, 1])
        reversed_at = relax.op.subtract(relax.op.subtract(lengths_at, relax.const(1, int64)),
                                        position_at)
        source = bb.normalize(relax.op.where(relax.op.less(position_at, lengths_at), reversed_at,
                                             position_at))
        shape = [data.ty.shape.values[d] if d in (batch_axis, time_axis) else 1
                 for d in range(rank)]
        source = relax.op.broadcast_to(relax.op.reshape(source, shape), data.ty.shape)
        return relax.op.gather_elements(data, source, axis=time_axis)


class TensorScatter(tvm_onnx.OnnxOpConverter):
    """`update` written into `past_cache` along `axis` from write_indices[b] on (per batch
    entry; wrapping around in circular mode): position p of the cache takes update step
    p - start where that is within the update, else keeps the cache's value."""

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        cache, update = bb.normalize(inputs[0]), bb.normalize(inputs[1])
        rank = cache.ty.ndim
        axis = attr.get("axis", -2) % rank
        mode = attr.get("mode", b"linear")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        int64 = "int64"
        capacity = cache.ty.shape.values[axis]
        steps = update.ty.shape.values[axis]
        if optional_input(inputs, 2) is not None:
            start = bb.normalize(relax.op.astype(inputs[2], int64))
        else:
            start = bb.normalize(relax.op.zeros([cache.ty.shape.values[0]], int64))
        start = relax.op.reshape(start, [-1] + [1] * (rank - 1))
        position = relax.op.reshape(relax.op.arange(0, capacity, 1, int64),
                                    [capacity if d == axis else 1 for d in range(rank)])
        offset = relax.op.subtract(position, start)
        if mode == "circular":
            offset = relax.op.floor_mod(offset, dim_tensor(capacity))
        elif mode != "linear":
            raise ValueError(f"TensorScatter mode {mode!r}: expected linear or circular")
        offset = bb.normalize(offset)
        written = relax.op.logical_and(relax.op.greater_equal(offset, relax.const(0, int64)),
                                       relax.op.less(offset, dim_tensor(steps)))
        index = relax.op.clip(offset, 0, steps - 1)
        shape = list(cache.ty.shape.values)
        index = relax.op.broadcast_to(index, shape)
        read = relax.op.gather_elements(update, index, axis=axis)
        return relax.op.where(relax.op.broadcast_to(written, shape), read, cache)


class RotaryEmbedding(tvm_onnx.OnnxOpConverter):
    """Rotary position embedding of [B, H, S, D] or [B, S, H*D] input: the first
    rotary_embedding_dim features of each head rotated by the cos/sin caches (indexed by
    position_ids when given), as two halves or interleaved pairs."""

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        cos, sin = bb.normalize(inputs[1]), bb.normalize(inputs[2])
        position_ids = optional_input(inputs, 3)
        interleaved = bool(attr.get("interleaved", 0))
        rank = x.ty.ndim
        if rank == 4:
            heads_first = bb.normalize(relax.op.permute_dims(x, [0, 2, 1, 3]))  # [B, S, H, D]
        else:
            num_heads = attr.get("num_heads", 0)
            if not num_heads:
                raise ValueError("RotaryEmbedding of 3-D input needs num_heads")
            batch, seq, hidden = x.ty.shape.values
            heads_first = bb.normalize(relax.op.reshape(
                x, [batch, seq, num_heads, tirx.floordiv(hidden, num_heads)]))
        head_size = heads_first.ty.shape.values[3]
        rotary = attr.get("rotary_embedding_dim", 0) or head_size
        half = rotary // 2 if isinstance(rotary, int) else tirx.floordiv(rotary, 2)
        if position_ids is not None:
            ids = relax.op.astype(position_ids, "int64")
            cos, sin = (relax.op.take(c, ids, axis=0) for c in (cos, sin))  # [B, S, half]
        cos, sin = (bb.normalize(relax.op.expand_dims(c, 2)) for c in (cos, sin))
        rotated = bb.normalize(relax.op.strided_slice(heads_first, [3], [0], [rotary]))
        kept = relax.op.strided_slice(heads_first, [3], [rotary], [head_size])
        if interleaved:
            pairs = bb.normalize(relax.op.reshape(rotated, list(rotated.ty.shape.values[:3])
                                                  + [half, 2]))
            first = relax.op.squeeze(relax.op.strided_slice(pairs, [4], [0], [1]), [4])
            second = relax.op.squeeze(relax.op.strided_slice(pairs, [4], [1], [2]), [4])
        else:
            first = relax.op.strided_slice(rotated, [3], [0], [half])
            second = relax.op.strided_slice(rotated, [3], [half], [rotary])
        real = relax.op.subtract(relax.op.multiply(cos, first), relax.op.multiply(sin, second))
        imag = relax.op.add(relax.op.multiply(sin, first), relax.op.multiply(cos, second))
        if interleaved:
            both = bb.normalize(relax.op.stack([real, imag], axis=4))
            rotated = relax.op.reshape(both, rotated.ty.shape)
        else:
            rotated = relax.op.concat([real, imag], axis=3)
        output = relax.op.concat([rotated, kept], axis=3)
        if rank == 4:
            return relax.op.permute_dims(output, [0, 2, 1, 3])
        return relax.op.reshape(output, x.ty.shape)


CONVERTERS = {"Swish": Swish, "SwiGLU": SwiGLU, "Celu": Celu, "Elu": Elu, "BitCast": BitCast,
              "CumProd": CumProd, "ReverseSequence": ReverseSequence,
              "TensorScatter": TensorScatter, "RotaryEmbedding": RotaryEmbedding}
