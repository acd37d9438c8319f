"""Attention kernels for TVM's paged KV cache on CPU, vectorized and parallel.

TVM's own CPU kernels (`tvm.relax.frontend.nn.llm`, `_attention_decode_cpu` and
`_attention_prefill_ragged_cpu`) are serial scalar loops: on SmolLM2-135M a 256-token prefill
spent about 1.1 s in them, and 8 sequences' decode step 30 ms. These take the same arguments, so
the cache calls them in their place (`passes/paged_kv.py`); they support what graft's PagedKV
uses: RoPE applied by the model (rotary_mode 0) and no sliding window.

Both compute, per query row and head, softmax(q . k * sm_scale) @ v over the row's keys with an
online softmax over blocks of 16 keys: a block's 16 scores (each a dot product over the head
dims, 16 lanes at a time) are one vector, exponentiated together with the fast exp softmax uses
elsewhere. Outputs follow TVM's conventions: lse is the log2 of the softmax denominator plus the
maximum score, both in base-2 units (scores times log2(e)), so the cache can merge a prefill's
new-token and paged-history halves. Tasks are (sequence, KV head) for decode, the query heads of
a group sharing each key read; (query head, every SPREAD-th row) for prefill.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from graft.codegen.cpu.attention import _across_lanes, _dot
from graft.codegen.cpu.softmax import fast_exp

LANES = 16
LOG2E = math.log2(math.e)
EMPTY = -5e4  # TVM's lse for a row with no keys
SPREAD = 8


def _online_softmax(vec: int, dvs: int):
    """Row r's softmax state after one more block of scores (score[r, :vec], turned into the
    block's weights): running maximum top[r], sum total[r], weighted values acc[r]."""

    @T.macro
    def update(score, top, total, acc, scalar, r):
        scalar[r, 0] = T.max(top[r], _across_lanes(T.max, score[r, T.ramp(0, 1, vec)]))
        scalar[r, 1] = fast_exp(top[r] - scalar[r, 0])
        top[r] = scalar[r, 0]
        score[r, T.ramp(0, 1, vec)] = fast_exp(
            score[r, T.ramp(0, 1, vec)] - T.broadcast(scalar[r, 0], vec))
        total[r] = total[r] * scalar[r, 1] + _across_lanes(
            tirx.Add, score[r, T.ramp(0, 1, vec)])
        for dv in T.unroll(dvs):
            acc[r, T.ramp(dv * vec, 1, vec)] = \
                acc[r, T.ramp(dv * vec, 1, vec)] * T.broadcast(scalar[r, 1], vec)

    return update


def _write_row(vec: int, dvs: int):
    """out[row, head] = acc[r] / total[r] and its lse (zeros and EMPTY for a row no key
    reached)."""

    @T.macro
    def write(acc, top, total, r, output, row, head, lse):
        if total[r] > T.float32(0):
            for dv in T.unroll(dvs):
                output[row, head, T.ramp(dv * vec, 1, vec)] = \
                    acc[r, T.ramp(dv * vec, 1, vec)] * T.broadcast(T.float32(1) / total[r], vec)
            lse[row, head] = top[r] * T.float32(LOG2E) + T.log2(total[r])
        else:
            for dv in T.unroll(dvs):
                output[row, head, T.ramp(dv * vec, 1, vec)] = T.broadcast(T.float32(0), vec)
            lse[row, head] = T.float32(EMPTY)

    return write


def supports(head_dim: int, dtype: str) -> bool:
    return head_dim % LANES == 0 and dtype == "float32"


def paged_decode_func(kv_heads: int, heads: int, dim: int, page_size: int = 16):
    """`batch_decode_paged_kv`'s signature: one new query row per sequence over its pages."""
    group, vec, dvs = heads // kv_heads, LANES, dim // LANES
    update, write = _online_softmax(vec, dvs), _write_row(vec, dvs)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(q_handle: T.handle, pages_handle: T.handle,
                              page_indptr_handle: T.handle, page_values_handle: T.handle,
                              length_info_handle: T.handle, k_rope_pos_offset_handle: T.handle,
                              q_rope_position_handle: T.handle, output_handle: T.handle,
                              lse_handle: T.handle, rotary_mode: T.int32, rope_scale: T.float32,
                              rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True,
                     "global_symbol": "batch_decode_paged_kv_cpu"})
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        indptr_offset, values_offset, k_rope_offset, q_rope_offset, length_offset = \
            T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(q_handle, (B, heads, dim), "float32")
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, kv_heads, page_size, dim),
                               "float32")
        page_indptr = T.match_buffer(page_indptr_handle, (B + 1,), "int32",
                                     elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32",
                                     elem_offset=values_offset)
        length_info = T.match_buffer(length_info_handle, (B,), "int32",
                                     elem_offset=length_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32",
                                           elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32",
                                         elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (B, heads, dim), "float32")
        lse = T.match_buffer(lse_handle, (B, heads), "float32")
        with T.sblock("root"):
            for task in T.parallel(B * kv_heads):
                b = task // kv_heads
                g = task % kv_heads
                top = T.decl_buffer((group,), "float32", scope="local")
                total = T.decl_buffer((group,), "float32", scope="local")
                acc = T.decl_buffer((group, dim), "float32", scope="local")
                score = T.decl_buffer((group, vec), "float32", scope="local")
                scalar = T.decl_buffer((group, 2), "float32", scope="local")
                first = page_indptr[b]
                count = T.if_then_else(page_indptr[b + 1] > first,
                                       (page_indptr[b + 1] - first - 1) * page_size +
                                       length_info[b], 0)
                for r in T.unroll(group):
                    top[r] = T.float32(-3.0e38)
                    total[r] = T.float32(0)
                    for dv in T.unroll(dvs):
                        acc[r, T.ramp(dv * vec, 1, vec)] = T.broadcast(T.float32(0), vec)
                for block in range((count + vec - 1) // vec):
                    for r in T.unroll(group):
                        for c in range(vec):
                            if block * vec + c < count:
                                score[r, c] = _dot(
                                    q, (b, g * group + r), pages,
                                    (page_values[first + (block * vec + c) // page_size], 0, g,
                                     (block * vec + c) % page_size), dim) * sm_scale
                            else:
                                score[r, c] = T.float32(-3.0e38)
                        update(score, top, total, acc, scalar, r)
                    for c in range(T.min(vec, count - block * vec)):
                        for r in T.unroll(group):
                            for dv in T.unroll(dvs):
                                acc[r, T.ramp(dv * vec, 1, vec)] = \
                                    acc[r, T.ramp(dv * vec, 1, vec)] + \
                                    T.broadcast(score[r, c], vec) * pages[
                                        page_values[first + (block * vec + c) // page_size], 1,
                                        g, (block * vec + c) % page_size,
                                        T.ramp(dv * vec, 1, vec)]
                for r in T.unroll(group):
                    write(acc, top, total, r, output, b, g * group + r, lse)

    return batch_decode_paged_kv


def ragged_prefill_func(kv_heads: int, heads: int, dim: int):
    """`batch_prefill_ragged_kv`'s signature: each sequence's new query rows over its new keys
    (causal when `causal` is set: row i sees the keys up to kv_len - qo_len + i)."""
    group, vec, dvs, spread = heads // kv_heads, LANES, dim // LANES, SPREAD
    update, write = _online_softmax(vec, dvs), _write_row(vec, dvs)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle,
                                var_v: T.handle, var_kv_indptr: T.handle,
                                var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
                                var_output: T.handle, var_lse: T.handle, causal: T.int32,
                                rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True,
                     "global_symbol": "batch_prefill_ragged_kv_cpu"})
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q_indptr_offset, kv_indptr_offset, q_rope_offset, k_rope_offset = \
            T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, heads, dim), "float32")
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, kv_heads, dim), "float32")
        v = T.match_buffer(var_v, (kv_len, kv_heads, dim), "float32")
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32",
                                   elem_offset=kv_indptr_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",
                                         elem_offset=q_rope_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                           elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, heads, dim), "float32")
        lse = T.match_buffer(var_lse, (qo_len, heads), "float32")
        with T.sblock("root"):
            for task in T.parallel(heads * spread):
                h = task // spread
                g = h // group
                top = T.decl_buffer((1,), "float32", scope="local")
                total = T.decl_buffer((1,), "float32", scope="local")
                acc = T.decl_buffer((1, dim), "float32", scope="local")
                score = T.decl_buffer((1, vec), "float32", scope="local")
                scalar = T.decl_buffer((1, 2), "float32", scope="local")
                for b in range(batch_size):
                    rows = q_indptr[b + 1] - q_indptr[b]
                    keys = kv_indptr[b + 1] - kv_indptr[b]
                    for step in range((rows - task % spread + spread - 1) // spread):
                        row = task % spread + step * spread
                        visible = T.if_then_else(causal > 0,
                                                 T.min(keys - rows + row + 1, keys), keys)
                        top[0] = T.float32(-3.0e38)
                        total[0] = T.float32(0)
                        for dv in T.unroll(dvs):
                            acc[0, T.ramp(dv * vec, 1, vec)] = T.broadcast(T.float32(0), vec)
                        for block in range((visible + vec - 1) // vec):
                            for c in range(vec):
                                if block * vec + c < visible:
                                    score[0, c] = _dot(q, (q_indptr[b] + row, h), k,
                                                       (kv_indptr[b] + block * vec + c, g),
                                                       dim) * sm_scale
                                else:
                                    score[0, c] = T.float32(-3.0e38)
                            update(score, top, total, acc, scalar, 0)
                            for c in range(T.min(vec, visible - block * vec)):
                                for dv in T.unroll(dvs):
                                    acc[0, T.ramp(dv * vec, 1, vec)] = \
                                        acc[0, T.ramp(dv * vec, 1, vec)] + \
                                        T.broadcast(score[0, c], vec) * \
                                        v[kv_indptr[b] + block * vec + c, g,
                                          T.ramp(dv * vec, 1, vec)]
                        write(acc, top, total, 0, output, q_indptr[b] + row, h, lse)

    return batch_prefill_ragged_kv
