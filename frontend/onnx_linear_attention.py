"""The opset-27 ops of linear-attention / state-space decoders (Gated DeltaNet, Mamba-style
short convolutions): CausalConvWithState and LinearAttention, as onnx.reference computes
them. LinearAttention's recurrence is unrolled over the (static) sequence length, in float32.
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import optional_input


def _text(value, default):
    value = default if value is None else value
    return value.decode() if isinstance(value, bytes) else value


class CausalConvWithState(tvm_onnx.OnnxOpConverter):
    """A depthwise causal 1-D convolution: [B, C, L] left-padded by the past state (zeros
    without one) to L + k - 1, convolved with weight [C, 1, k], plus bias, then SiLU where
    asked; the new state is the padded input's last k - 1 positions."""

    @classmethod
    def _impl_v27(cls, bb, inputs, attr, params):
        x, weight = bb.normalize(inputs[0]), bb.normalize(inputs[1])
        bias, past = optional_input(inputs, 2), optional_input(inputs, 3)
        activation = _text(attr.get("activation"), "none")
        if activation not in ("none", "silu", "swish"):
            raise ValueError(f"CausalConvWithState activation {activation!r}: expected none, "
                             "silu or swish")
        dtype = str(x.ty.dtype)
        batch, channels, _ = x.ty.shape.values
        width = int(weight.ty.shape.values[2])
        if past is None:
            past = relax.op.zeros([batch, channels, width - 1], dtype)
        padded = bb.normalize(relax.op.concat([past, x], axis=2))
        out = relax.op.nn.conv1d(padded, weight, groups=int(channels), out_dtype="float32")
        if bias is not None:
            out = relax.op.add(out, relax.op.astype(relax.op.reshape(bias, [1, -1, 1]), "float32"))
        out = bb.normalize(relax.op.astype(out, dtype))  # accumulated in float32, as numpy
        if activation != "none":
            wide = relax.op.astype(out, "float32")
            out = relax.op.astype(relax.op.multiply(wide, relax.op.sigmoid(wide)), dtype)
        length = padded.ty.shape.values[2]
        state = relax.op.strided_slice(padded, [2], [length - (width - 1)], [length])
        return relax.Tuple([bb.normalize(out), bb.normalize(state)])


def _heads(bb, x, num_heads):
    """[B, T, H*D] -> [B, H, T, D] in float32."""
    batch, steps, hidden = x.ty.shape.values
    return bb.normalize(relax.op.astype(relax.op.permute_dims(relax.op.reshape(
        x, [batch, steps, num_heads, tirx.floordiv(hidden, num_heads)]), [0, 2, 1, 3]),
        "float32"))


def _step(bb, x, t):
    """Step t of [B, H, T, D]: [B, H, D]."""
    return bb.normalize(relax.op.squeeze(relax.op.strided_slice(x, [2], [t], [t + 1]), [2]))


class LinearAttention(tvm_onnx.OnnxOpConverter):
    """A state S [B, Hkv, dk, dv] updated per step: decayed by exp(g_t) (gated rules),
    corrected toward v_t by beta_t (delta rules: v_t <- beta_t (v_t - S^T k_t)), plus
    k_t v_t^T; the output is scale * q_t S, each key/value head read by its query group."""

    @classmethod
    def _impl_v27(cls, bb, inputs, attr, params):
        query, key, value = (bb.normalize(inputs[i]) for i in range(3))
        past, decay, beta = (optional_input(inputs, i) for i in (3, 4, 5))
        rule = _text(attr.get("update_rule"), "gated_delta")
        gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
        q_heads, kv_heads = attr["q_num_heads"], attr["kv_num_heads"]
        dtype = str(query.ty.dtype)
        batch, steps, q_hidden = query.ty.shape.values
        if not isinstance(steps, tirx.IntImm):
            raise NotImplementedError("LinearAttention over a run-time sequence length")
        steps = int(steps)
        key_size = int(q_hidden) // q_heads
        value_size = int(value.ty.shape.values[2]) // kv_heads
        group = q_heads // kv_heads
        q, k, v = _heads(bb, query, q_heads), _heads(bb, key, kv_heads), _heads(bb, value,
                                                                                kv_heads)
        if gating:
            decay = _heads(bb, bb.normalize(decay), kv_heads)  # [B, Hkv, T, 1 or dk]
        if delta:
            beta = bb.normalize(beta)
            beta = _heads(bb, beta, int(beta.ty.shape.values[2]))  # [B, Hkv or 1, T, 1]
        if past is not None:
            state = bb.normalize(relax.op.astype(past, "float32"))
            state_dtype = str(bb.normalize(past).ty.dtype)
        else:
            state = relax.op.zeros([batch, kv_heads, key_size, value_size], "float32")
            state_dtype = dtype
        scale = attr.get("scale") or 1.0 / float(key_size) ** 0.5
        scale = relax.const(scale, "float32")
        outputs = []
        for t in range(steps):
            k_t, v_t = _step(bb, k, t), _step(bb, v, t)
            if gating:
                g_t = relax.op.exp(_step(bb, decay, t))  # [B, Hkv, 1 or dk]
                state = relax.op.multiply(state, relax.op.expand_dims(g_t, -1))
            if delta:
                retrieved = relax.op.squeeze(relax.op.matmul(relax.op.expand_dims(k_t, 2),
                                                             state), [2])  # [B, Hkv, dv]
                v_t = relax.op.multiply(_step(bb, beta, t), relax.op.subtract(v_t, retrieved))
            state = bb.normalize(relax.op.add(state, relax.op.multiply(
                relax.op.expand_dims(k_t, -1), relax.op.expand_dims(v_t, -2))))
            read = state if group == 1 else relax.op.repeat(state, group, axis=1)
            q_t = relax.op.expand_dims(_step(bb, q, t), 2)  # [B, Hq, 1, dk]
            outputs.append(relax.op.multiply(scale, relax.op.matmul(q_t, read)))  # [B,Hq,1,dv]
        output = relax.op.concat(outputs, axis=2)  # [B, Hq, T, dv]
        output = relax.op.reshape(relax.op.permute_dims(output, [0, 2, 1, 3]),
                                  [batch, steps, q_heads * value_size])
        return relax.Tuple([bb.normalize(relax.op.astype(output, dtype)),
                            bb.normalize(relax.op.astype(state, state_dtype))])


CONVERTERS = {"CausalConvWithState": CausalConvWithState, "LinearAttention": LinearAttention}
