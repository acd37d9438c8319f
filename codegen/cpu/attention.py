"""Masked attention in one kernel: `attention_func` for many query rows (prefill, or a
whole sequence), `decode_attention_func` for a static few (a decode step).

    out[b, h] = softmax(where(mask[b, h], q[b, h] @ k[b, h // R]^T, -inf)) @ v[b, h // R]

`attention_func` is written scheduled, flash-attention style. The keys are first copied
transposed and zero-padded to whole blocks ([B, Hkv, D, T']: a vector of keys per head-dim
element, so the score product is vector FMAs). Then each task takes one head and every SPREAD-th
group of ROWS query rows (early and late rows of a causal mask alike) and walks the keys in
blocks of KEYS, keeping per row a running maximum, sum and weighted sum of values (online
softmax) in registers: the [queries, keys] scores are never stored. A block whose mask is false
for all the rows is skipped (half of them for a causal mask). Values are read in place, R query
heads sharing a key/value head (grouped-query attention without transformers' repeat_kv
copies). A row whose mask is false everywhere gets the mean of the values, as softmax over
equal scores does. exp is the fast approximation softmax uses elsewhere. Measured on SmolLM2's
256-token prefill (9 heads over 3): about 1.1 ms a layer, against about 2.3 ms for the separate
scores product, softmax, context product and repeat_kv copies.

`decode_attention_func` has one task per key/value head, holding the query rows of all R
heads that share it: the cache is read once per step, in place (scores as dot products, no
transposed copy). Measured on SmolLM2's decode step (past 128): one kernel of about 10 us a
layer, against about 55 us for the grouped scores and context products, mask and softmax.

`rewrites/fused_attention.py` routes attention to both.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from graft.codegen.cpu.softmax import fast_exp

LANES = 16       # float32 per AVX-512 register
KEYS = 4 * LANES  # keys per block
ROWS = 4         # query rows at a time (their running sums stay in registers)
SPREAD = 8       # tasks per head (each allocates its scratch once)
UNROLL = 4       # keys per step of the unrolled value product
LOWEST = -3.4028234663852886e38


def _over_vectors(op, buffer, row, count):
    """op over the `count` vectors of `buffer[row]`, lane by lane."""
    total = buffer[row, tirx.Ramp(0, 1, LANES)]
    for i in range(1, count):
        total = op(total, buffer[row, tirx.Ramp(i * LANES, 1, LANES)])
    return total


def _any_of(vectors):
    """The lane-wise maximum of int vectors."""
    total = vectors[0]
    for vector in vectors[1:]:
        total = tirx.Max(total, vector)
    return total


def _across_lanes(op, vector):
    """op over the lanes of a vector, as a tree of halves (log2(lanes) steps)."""
    return _across_lanes_of_rows(op, [vector])


def _across_lanes_of_rows(op, vectors):
    """op over the lanes of each of `vectors` (a power of two of them, each of LANES lanes),
    as one vector holding row i's result in lane i: pairs of rows are first folded into one
    vector, each row in half the lanes, so every step serves several rows."""
    lanes = vectors[0].ty.dtype.lanes
    rows, width = 1, lanes  # each vector holds `rows` rows of `width` lanes

    def half(offset, second):  # the lanes of the first (second) half of each row
        return [offset + i * width + j + (width // 2 if second else 0)
                for i in range(rows) for j in range(width // 2)]

    def shuffle(sources, indices):
        return tirx.Shuffle(sources, [tirx.IntImm("int32", i) for i in indices])

    while len(vectors) > 1:
        vectors = [op(shuffle([a, b], half(0, False) + half(lanes, False)),
                      shuffle([a, b], half(0, True) + half(lanes, True)))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        rows, width = rows * 2, width // 2
    vector = vectors[0]
    while width > 1:
        vector = op(shuffle([vector], half(0, False)), shuffle([vector], half(0, True)))
        width //= 2
    return vector


def _mean_of_values(vec: int, dim_vectors: int):
    """out[b, head, row] = the mean of v[b, g, :t] (accumulated in acc[r]): what softmax gives
    a row whose scores are all masked (equal)."""

    @T.macro
    def write_mean(acc, r, v, b, g, t, out, head, row):
        for dv in T.unroll(dim_vectors):
            acc[r, T.ramp(dv * vec, 1, vec)] = T.broadcast(T.float32(0), vec)
        for c in range(t):
            for dv in T.unroll(dim_vectors):
                acc[r, T.ramp(dv * vec, 1, vec)] = acc[r, T.ramp(dv * vec, 1, vec)] + \
                    v[b, g, c, T.ramp(dv * vec, 1, vec)]
        for dv in T.unroll(dim_vectors):
            out[b, head, row, T.ramp(dv * vec, 1, vec)] = acc[r, T.ramp(dv * vec, 1, vec)] * \
                T.broadcast(T.float32(1) / T.Cast("float32", t), vec)

    return write_mean


def attention_func(heads: int, kv_heads: int, dim: int) -> tirx.PrimFunc:
    """The kernel for `heads` query heads over `kv_heads` key/value heads of `dim` elements;
    batch, query and key counts and the mask's broadcast dims are symbolic."""
    vec, keys, rows_per_task, spread, group = LANES, KEYS, ROWS, SPREAD, heads // kv_heads
    key_vectors, dim_vectors = KEYS // LANES, dim // LANES
    write_mean = _mean_of_values(vec, dim_vectors)

    @T.prim_func(private=True, s_tir=True)  # in a root block, as Relax's passes expect
    def attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_mask: T.handle,
                  var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "Attention"})
        batch, n, t, mask_batch, mask_heads = T.int64(), T.int64(), T.int64(), T.int64(), \
            T.int64()
        q = T.match_buffer(var_q, (batch, heads, n, dim), "float32")
        k = T.match_buffer(var_k, (batch, kv_heads, t, dim), "float32")
        v = T.match_buffer(var_v, (batch, kv_heads, t, dim), "float32")
        mask = T.match_buffer(var_mask, (mask_batch, mask_heads, n, t), "bool")
        out = T.match_buffer(var_out, (batch, heads, n, dim), "float32")
        with T.sblock("root"):
            kt = T.alloc_buffer((batch, kv_heads, dim, (t + keys - 1) // keys * keys), "float32")
            for task in T.parallel(batch * kv_heads * dim):  # keys transposed, zero-padded
                for c in range((t + keys - 1) // keys * keys):
                    kt[task // (kv_heads * dim), task // dim % kv_heads, task % dim, c] = \
                        T.if_then_else(c < t, k[task // (kv_heads * dim), task // dim % kv_heads,
                                                T.min(c, t - 1), task % dim], T.float32(0))
            for task in T.parallel(batch * heads * spread):
                b = task // (heads * spread)
                h = task // spread % heads
                mb = T.min(b, mask_batch - 1)
                mh = T.min(h, mask_heads - 1)
                g = h // group
                top = T.decl_buffer((rows_per_task,), "float32", scope="local")
                peak = T.decl_buffer((rows_per_task,), "float32", scope="local")
                scale = T.decl_buffer((rows_per_task,), "float32", scope="local")
                sums = T.decl_buffer((rows_per_task,), "float32", scope="local")
                total = T.decl_buffer((rows_per_task, vec), "float32", scope="local")
                acc = T.decl_buffer((rows_per_task, dim), "float32", scope="local")
                score = T.decl_buffer((rows_per_task, keys), "float32", scope="local")
                prob = T.decl_buffer((rows_per_task, keys), "float32", scope="local")
                live = T.decl_buffer((1,), "int32", scope="local")
                # the task's row blocks: every `spread`-th, so that tasks get early (short) and
                # late (long) rows of a causal mask alike
                for step in range(((n + rows_per_task - 1) // rows_per_task - task % spread +
                                   spread - 1) // spread):
                    row0 = (task % spread + step * spread) * rows_per_task
                    for r in T.unroll(rows_per_task):
                        top[r] = T.float32(LOWEST)
                        total[r, T.ramp(0, 1, vec)] = T.broadcast(T.float32(0), vec)
                        for dv in T.unroll(dim_vectors):
                            acc[r, T.ramp(dv * vec, 1, vec)] = T.broadcast(T.float32(0), vec)
                    for block in range((t + keys - 1) // keys):
                        base = block * keys
                        width = T.min(keys, t - base)
                        live[0] = 0
                        if width == keys:  # a whole block: its mask vectors or-ed
                            live[0] = _across_lanes(tirx.Max, _any_of(
                                [T.Cast(f"int32x{vec}", mask[mb, mh, T.min(row0 + r, n - 1),
                                                               T.ramp(base + kv * vec, 1, vec)])
                                 for r in range(rows_per_task) for kv in range(key_vectors)]))
                        else:
                            for r in range(T.min(rows_per_task, n - row0)):
                                for c in range(width):
                                    live[0] = live[0] + T.Cast("int32",
                                                               mask[mb, mh, row0 + r, base + c])
                        if live[0] > 0:
                            for r in T.unroll(rows_per_task):
                                for kv in T.unroll(key_vectors):
                                    score[r, T.ramp(kv * vec, 1, vec)] = \
                                        T.broadcast(T.float32(0), vec)
                            for d in range(dim):
                                for r in T.unroll(rows_per_task):
                                    for kv in T.unroll(key_vectors):
                                        score[r, T.ramp(kv * vec, 1, vec)] = \
                                            score[r, T.ramp(kv * vec, 1, vec)] + \
                                            T.broadcast(q[b, h, T.min(row0 + r, n - 1), d], vec) * \
                                            kt[b, g, d, T.ramp(base + kv * vec, 1, vec)]
                            for r in T.unroll(rows_per_task):
                                for kv in T.unroll(key_vectors):
                                    if base + kv * vec + vec <= t:
                                        prob[r, T.ramp(kv * vec, 1, vec)] = T.Select(
                                            mask[mb, mh, T.min(row0 + r, n - 1),
                                                 T.ramp(base + kv * vec, 1, vec)],
                                            score[r, T.ramp(kv * vec, 1, vec)],
                                            T.broadcast(T.float32(LOWEST), vec))
                                    else:  # past the last key, or the partial vector before it
                                        for c in range(vec):
                                            prob[r, kv * vec + c] = T.float32(LOWEST)
                                        for c in range(T.max(T.min(vec, t - base - kv * vec), 0)):
                                            if mask[mb, mh, T.min(row0 + r, n - 1),
                                                    base + kv * vec + c]:
                                                prob[r, kv * vec + c] = score[r, kv * vec + c]
                            # the rows' new maxima (in one vector) and how much that scales
                            # what they have summed so far; a row masked so far keeps LOWEST,
                            # scale 1, and weights 0
                            peak[T.ramp(0, 1, rows_per_task)] = T.max(
                                top[T.ramp(0, 1, rows_per_task)], _across_lanes_of_rows(
                                    T.max, [_over_vectors(T.max, prob, r, key_vectors)
                                            for r in range(rows_per_task)]))
                            scale[T.ramp(0, 1, rows_per_task)] = fast_exp(
                                top[T.ramp(0, 1, rows_per_task)] -
                                peak[T.ramp(0, 1, rows_per_task)])
                            top[T.ramp(0, 1, rows_per_task)] = peak[T.ramp(0, 1, rows_per_task)]
                            for r in T.unroll(rows_per_task):
                                for kv in T.unroll(key_vectors):
                                    prob[r, T.ramp(kv * vec, 1, vec)] = T.Select(
                                        prob[r, T.ramp(kv * vec, 1, vec)] >
                                        T.broadcast(T.float32(LOWEST), vec),
                                        fast_exp(prob[r, T.ramp(kv * vec, 1, vec)] -
                                                 T.broadcast(top[r], vec)),
                                        T.broadcast(T.float32(0), vec))
                                total[r, T.ramp(0, 1, vec)] = \
                                    total[r, T.ramp(0, 1, vec)] * T.broadcast(scale[r], vec) + \
                                    _over_vectors(tirx.Add, prob, r, key_vectors)
                                for dv in T.unroll(dim_vectors):
                                    acc[r, T.ramp(dv * vec, 1, vec)] = \
                                        acc[r, T.ramp(dv * vec, 1, vec)] * \
                                        T.broadcast(scale[r], vec)
                            if width == keys:
                                for c0 in range(keys // UNROLL):
                                    for c1 in T.unroll(UNROLL):
                                        for r in T.unroll(rows_per_task):
                                            for dv in T.unroll(dim_vectors):
                                                acc[r, T.ramp(dv * vec, 1, vec)] = \
                                                    acc[r, T.ramp(dv * vec, 1, vec)] + \
                                                    T.broadcast(prob[r, c0 * UNROLL + c1], vec) * \
                                                    v[b, g, base + c0 * UNROLL + c1,
                                                      T.ramp(dv * vec, 1, vec)]
                            else:
                                for c in range(width):
                                    for r in T.unroll(rows_per_task):
                                        for dv in T.unroll(dim_vectors):
                                            acc[r, T.ramp(dv * vec, 1, vec)] = \
                                                acc[r, T.ramp(dv * vec, 1, vec)] + \
                                                T.broadcast(prob[r, c], vec) * \
                                                v[b, g, base + c, T.ramp(dv * vec, 1, vec)]
                    sums[T.ramp(0, 1, rows_per_task)] = _across_lanes_of_rows(
                        tirx.Add, [total[r, T.ramp(0, 1, vec)] for r in range(rows_per_task)])
                    for r in T.unroll(rows_per_task):
                        if row0 + r >= n:
                            pass
                        elif sums[r] > T.float32(0):
                            for dv in T.unroll(dim_vectors):
                                out[b, h, row0 + r, T.ramp(dv * vec, 1, vec)] = \
                                    acc[r, T.ramp(dv * vec, 1, vec)] * \
                                    T.broadcast(T.float32(1) / sums[r], vec)
                        else:  # masked everywhere: softmax of equal scores, the mean of v
                            write_mean(acc, r, v, b, g, t, out, h, row0 + r)

    return attention


def _dot(q, q_index, k, k_index, dim: int):
    """sum over d of q[*q_index, d] * k[*k_index, d], as vectors then across lanes."""
    total = None
    for dv in range(dim // LANES):
        lanes = tirx.Ramp(dv * LANES, 1, LANES)
        term = q[(*q_index, lanes)] * k[(*k_index, lanes)]
        total = term if total is None else total + term
    return _across_lanes(tirx.Add, total)


def decode_attention_func(heads: int, kv_heads: int, dim: int, queries: int) -> tirx.PrimFunc:
    """The kernel for a few (`queries`, static) query rows per head, as in a decode step; batch
    and key counts and the mask's broadcast dims are symbolic.

    A task is one key/value head with every query row of the R query heads that share it: the
    keys and values are read once per step. Scores are dot products (the cache is read in
    place, untransposed), kept in a scratch row per query row; then their exact softmax and the
    weighted sum of values, VEC keys at a time."""
    vec, group = LANES, heads // kv_heads
    rows, dim_vectors = group * queries, dim // LANES
    write_mean = _mean_of_values(vec, dim_vectors)

    @T.prim_func(private=True, s_tir=True)
    def decode_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_mask: T.handle,
                         var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8,
                     "graft.schedule_rule": "DecodeAttention"})
        batch, t, mask_batch, mask_heads = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (batch, heads, queries, dim), "float32")
        k = T.match_buffer(var_k, (batch, kv_heads, t, dim), "float32")
        v = T.match_buffer(var_v, (batch, kv_heads, t, dim), "float32")
        mask = T.match_buffer(var_mask, (mask_batch, mask_heads, queries, t), "bool")
        out = T.match_buffer(var_out, (batch, heads, queries, dim), "float32")
        with T.sblock("root"):
            scores = T.alloc_buffer((batch * kv_heads, rows, (t + vec - 1) // vec * vec),
                                    "float32")
            for task in T.parallel(batch * kv_heads):
                b = task // kv_heads
                g = task % kv_heads
                mb = T.min(b, mask_batch - 1)
                top = T.decl_buffer((rows,), "float32", scope="local")
                total = T.decl_buffer((rows, vec), "float32", scope="local")
                prob = T.decl_buffer((rows, vec), "float32", scope="local")
                acc = T.decl_buffer((rows, dim), "float32", scope="local")
                for r in T.unroll(rows):
                    top[r] = T.float32(LOWEST)
                    total[r, T.ramp(0, 1, vec)] = T.broadcast(T.float32(0), vec)
                    for dv in T.unroll(dim_vectors):
                        acc[r, T.ramp(dv * vec, 1, vec)] = T.broadcast(T.float32(0), vec)
                for c in range(t):  # scores, masked, and each row's maximum
                    for r in T.unroll(rows):
                        scores[task, r, c] = T.Select(
                            mask[mb, T.min(g * group + r // queries, mask_heads - 1),
                                 r % queries, c],
                            _dot(q, (b, g * group + r // queries, r % queries), k, (b, g, c),
                                 dim), T.float32(LOWEST))
                        top[r] = T.max(top[r], scores[task, r, c])
                for c in range((t + vec - 1) // vec * vec - t):
                    for r in T.unroll(rows):
                        scores[task, r, t + c] = T.float32(LOWEST)
                for block in range((t + vec - 1) // vec):  # weights, their sum, the values
                    for r in T.unroll(rows):
                        prob[r, T.ramp(0, 1, vec)] = T.Select(
                            scores[task, r, T.ramp(block * vec, 1, vec)] >
                            T.broadcast(T.float32(LOWEST), vec),
                            fast_exp(scores[task, r, T.ramp(block * vec, 1, vec)] -
                                     T.broadcast(top[r], vec)),
                            T.broadcast(T.float32(0), vec))
                        total[r, T.ramp(0, 1, vec)] = total[r, T.ramp(0, 1, vec)] + \
                            prob[r, T.ramp(0, 1, vec)]
                    for c in range(T.min(vec, t - block * vec)):
                        for r in T.unroll(rows):
                            for dv in T.unroll(dim_vectors):
                                acc[r, T.ramp(dv * vec, 1, vec)] = \
                                    acc[r, T.ramp(dv * vec, 1, vec)] + \
                                    T.broadcast(prob[r, c], vec) * \
                                    v[b, g, block * vec + c, T.ramp(dv * vec, 1, vec)]
                for r in T.unroll(rows):
                    top[r] = _across_lanes(tirx.Add, total[r, T.ramp(0, 1, vec)])
                    if top[r] > T.float32(0):
                        for dv in T.unroll(dim_vectors):
                            out[b, g * group + r // queries, r % queries,
                                T.ramp(dv * vec, 1, vec)] = acc[r, T.ramp(dv * vec, 1, vec)] * \
                                T.broadcast(T.float32(1) / top[r], vec)
                    else:  # masked everywhere: softmax of equal scores, the mean of v
                        write_mean(acc, r, v, b, g, t, out, g * group + r // queries, r % queries)

    return decode_attention
