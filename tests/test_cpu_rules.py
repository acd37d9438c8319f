"""graft's CPU schedule rules: each kernel is compiled through graft's lowering and schedule
pass, checked to have been taken by the expected rule, run, and compared with numpy. Shapes
include odd and prime sizes and symbolic dims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from graft.codegen import build as codegen
from graft.codegen.target import resolve_target
from graft.passes.pipeline import CompileState, run_pipeline

TARGET = resolve_target("cpu")
RNG = np.random.default_rng(0)


def _lower_and_run(build_fn, arrays, expect_rules):
    """build_fn(bb, vars) -> output expr; arrays: numpy inputs, whose shapes may be symbolic
    in the module (a dim given as a str becomes a symbolic var of that name)."""
    mod = _lower(build_fn, arrays, expect_rules)
    vm = relax.VirtualMachine(codegen.build(mod, TARGET), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(a) for _, a in arrays])
    return result.numpy()


def _lower(build_fn, arrays, expect_rules) -> tvm.IRModule:
    """The module of `_lower_and_run`, lowered and scheduled."""
    bb = relax.BlockBuilder()
    params, sym = [], {}
    for i, (shape, array) in enumerate(arrays):
        dims = [sym.setdefault(d, tvm.tirx.Var(d, "int64")) if isinstance(d, str) else d
                for d in shape]
        params.append(relax.Var(f"x{i}", relax.TensorType(dims, str(array.dtype))))
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build_fn(bb, params))
        bb.emit_func_output(out)
    state = CompileState(bb.get(), {}, {}, target=TARGET)
    records = run_pipeline(state, codegen.lowering_entries(TARGET))
    report = next(r["did"] for r in records if r["pass"] == "schedule")
    assert report["rules"] == expect_rules, report
    assert not report["rule_failures"], report
    return state.mod


def _rand(*shape, dtype="float32"):
    return RNG.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("m,k,n", [(1000, 383, 77), (64, 576, 1536), (7, 1536, 384),
                                   (13, 2048, 96), (128, 32, 5)])
def test_matmul_static_odd_shapes(m, k, n):
    a, b = _rand(m, k), _rand(k, n)
    out = _lower_and_run(lambda bb, v: relax.op.matmul(v[0], v[1]),
                         [((m, k), a), ((k, n), b)], {"Matmul": 1})
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4 * math.sqrt(k))


@pytest.mark.parametrize("m", [1, 7, 77, 130])
def test_matmul_symbolic_rows_with_bias_gelu_residual(m):
    k, n = 96, 160
    a, w, bias, res = _rand(m, k), _rand(k, n), _rand(n), _rand(m, n)

    def graph(bb, v):
        y = bb.emit(relax.op.add(relax.op.matmul(v[0], v[1]), v[2]))
        return relax.op.add(relax.op.nn.gelu(y), v[3])

    out = _lower_and_run(graph, [(("m", k), a), ((k, n), w), ((n,), bias), (("m", n), res)],
                         {"Matmul": 1})
    y = a @ w + bias
    ref = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2))) + res
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [5, 77])
def test_matmul_symbolic_rows_long_k(m):
    """K = 1536 with symbolic rows: K runs in blocks, the row tile's strip of C in between."""
    k, n = 1536, 96
    a, w = _rand(m, k), _rand(k, n)
    out = _lower_and_run(lambda bb, v: relax.op.matmul(v[0], v[1]),
                         [(("m", k), a), ((k, n), w)], {"Matmul": 1})
    np.testing.assert_allclose(out, a @ w, rtol=1e-4, atol=1e-4 * math.sqrt(k))


@pytest.mark.parametrize("batch,seq", [(2, 37), (3, 1)])
def test_matmul_batched_rows_symbolic(batch, seq):
    """x[b, s, k] @ W[k, n]: rows from two symbolic axes (a projection in a transformer)."""
    a, w = _rand(batch, seq, 64), _rand(64, 48)
    out = _lower_and_run(lambda bb, v: relax.op.matmul(v[0], v[1]),
                         [(("b", "s", 64), a), ((64, 48), w)], {"Matmul": 1})
    np.testing.assert_allclose(out, a @ w, rtol=1e-4, atol=1e-4)


def _global_buffers(func: tvm.tirx.PrimFunc) -> list[str]:
    """The global buffers a scheduled PrimFunc allocates, as printed."""
    return [line.strip() for line in func.script().splitlines()
            if "T.sblock_alloc_buffer(" in line and "scope=" not in line]


@pytest.mark.parametrize("shape", [(8, 128), (3, 100), ("b", "s")])
def test_matmul_epilogue_runs_in_the_register_tile_for_rows_of_two_axes(shape):
    """x[b, s, k] @ W + bias, GELU, a residual, and a slice of x itself: with rows from two
    axes (a tile may straddle two b at s = 100), the epilogue is still computed on the tile
    in registers; no buffer of the product's size is written in between."""
    batch, seq, k, n = 3, 100, 64, 160
    if isinstance(shape[0], int):
        batch, seq = shape
    x, w, bias, res = _rand(batch, seq, k), _rand(k, n), _rand(n), _rand(batch, seq, n)

    def graph(bb, v):
        y = bb.emit(relax.op.nn.gelu(relax.op.add(relax.op.matmul(v[0], v[1]), v[2])))
        y = bb.emit(relax.op.add(y, v[3]))
        return relax.op.add(y, relax.op.strided_slice(v[0], axes=[2], begin=[0], end=[1]))

    arrays = [((*shape, k), x), ((k, n), w), ((n,), bias), ((*shape, n), res)]
    mod = _lower(graph, arrays, {"Matmul": 1})
    kernel = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and
                  f.attrs.get("graft.schedule_rule") == "Matmul")
    assert not [b for b in _global_buffers(kernel) if b.endswith(f"T.int64({n})))")], \
        _global_buffers(kernel)
    vm = relax.VirtualMachine(codegen.build(mod, TARGET), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for _, a in arrays]).numpy()
    y = x @ w + bias
    ref = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2))) + res + x[..., :1]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_attention_batched_matmuls():
    """Q K^T (B not contiguous along the output columns: packed) and P V, symbolic sequence."""
    q, kk, v = _rand(2, 3, 29, 32), _rand(2, 3, 29, 32), _rand(2, 3, 29, 32)

    def graph(bb, x):
        scores = bb.emit(relax.op.matmul(x[0], relax.op.permute_dims(x[1], [0, 1, 3, 2])))
        return relax.op.matmul(scores, x[2])

    shape = (2, 3, "s", 32)
    out = _lower_and_run(graph, [(shape, q), (shape, kk), (shape, v)], {"Matmul": 2})
    np.testing.assert_allclose(out, (q @ kk.transpose(0, 1, 3, 2)) @ v, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k,n", [(576, 49152), (383, 77), (1536, 576), (64, 3)])
def test_gemv_weight_rows(k, n):
    a, w = _rand(1, k), _rand(k, n)
    out = _lower_and_run(lambda bb, v: relax.op.matmul(v[0], v[1]),
                         [((1, k), a), ((k, n), w)], {"GEMV": 1})
    np.testing.assert_allclose(out, a @ w, rtol=1e-4, atol=1e-4 * math.sqrt(k))


def test_gemv_decode_attention_symbolic_past():
    """One query per head against a cache of symbolic length (dot products along K)."""
    q, cache = _rand(9, 1, 64), _rand(9, 131, 64)
    out = _lower_and_run(
        lambda bb, v: relax.op.matmul(v[0], relax.op.permute_dims(v[1], [0, 2, 1])),
        [((9, 1, 64), q), ((9, "p", 64), cache)], {"GEMV": 1})
    np.testing.assert_allclose(out, q @ cache.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 128, 128), ("n", 77), (3, 383)])
def test_softmax(shape):
    concrete = tuple(131 if d == "n" else d for d in shape)
    x = _rand(*concrete) * 4
    out = _lower_and_run(lambda bb, v: relax.op.nn.softmax(v[0], axis=-1), [(shape, x)],
                         {"RowReduction": 1})
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,width", [((8, 128), 384), (("s",), 576), ((3,), 77)])
def test_layer_norm(rows, width):
    concrete = tuple(5 if d == "s" else d for d in rows)
    x, gamma, beta = _rand(*concrete, width), _rand(width), _rand(width)
    axis = len(rows)
    out = _lower_and_run(
        lambda bb, v: relax.op.nn.layer_norm(v[0], v[1], v[2], axes=[axis], epsilon=1e-12),
        [((*rows, width), x), ((width,), gamma), ((width,), beta)], {"RowReduction": 1})
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-12) * gamma + beta,
                               rtol=1e-4, atol=1e-4)


def test_rms_norm_as_torch_writes_it():
    """x * rsqrt(mean(x^2) + eps) * w, element-wise ops around a mean."""
    x, w = _rand(1, 11, 576), _rand(576)

    def graph(bb, v):
        ms = bb.emit(relax.op.mean(relax.op.multiply(v[0], v[0]), axis=[-1], keepdims=True))
        return relax.op.multiply(relax.op.multiply(v[0], relax.op.rsqrt(
            relax.op.add(ms, relax.const(1e-5, "float32")))), v[1])

    # FuseOps leaves x * x as a kernel of its own
    out = _lower_and_run(graph, [((1, "s", 576), x), ((576,), w)],
                         {"RowReduction": 1, "Elementwise": 1})
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_elementwise_transpose_broadcast_symbolic():
    x, y = _rand(2, 37, 3, 32), _rand(37, 1)

    def graph(bb, v):
        return relax.op.multiply(relax.op.permute_dims(v[0], [0, 2, 1, 3]),
                                 relax.op.expand_dims(v[1], [0]))

    out = _lower_and_run(graph, [((2, "s", 3, 32), x), (("s", 1), y)], {"Elementwise": 1})
    np.testing.assert_allclose(out, x.transpose(0, 2, 1, 3) * y[None], rtol=1e-6)


def test_stack_of_symbolic_length_is_parallel_over_its_static_axes():
    """SmolLM2's new KV caches stacked, [30 layers, 1, 3 heads, t, 64] with t symbolic: the
    parallel loop is (layers, 1, heads), static; t stays a serial loop inside it (fused into the
    parallel loop, every vector recovered its indices by divisions by run-time values)."""
    parts = [_rand(1, 3, 45, 64) for _ in range(30)]

    mod = _lower(lambda bb, v: relax.op.stack(v, axis=0),
                 [((1, 3, "t", 64), p) for p in parts], {"Elementwise": 1})
    kernel = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    parallel = [line.strip() for line in kernel.script().splitlines() if "T.parallel(" in line]
    assert parallel == ["for ax0_ax1_ax2_fused in T.parallel(T.int64(90)):"], parallel
    vm = relax.VirtualMachine(codegen.build(mod, TARGET), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(p) for p in parts]).numpy()
    np.testing.assert_array_equal(out, np.stack(parts))


def test_fast_sigmoid_silu():
    """Llama's SiLU: x * sigmoid(x), legalized with a fast exp."""
    x = _rand(3, 7, 160) * 6
    out = _lower_and_run(lambda bb, v: relax.op.multiply(v[0], relax.op.sigmoid(v[0])),
                         [((3, "t", 160), x)], {"Elementwise": 1})
    np.testing.assert_allclose(out, x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)


def test_fast_silu_op():
    """`relax.nn.silu` (what torch's silu imports as) gets the fast exp too: its default
    legalization calls the scalar `T.sigmoid` for every element."""
    from graft.codegen.rewrites.fast_gelu import FAST_LEGALIZATIONS

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 96], "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.silu(x)))
    lowered = relax.transform.LegalizeOps(FAST_LEGALIZATIONS)(bb.get())
    assert "sigmoid" not in lowered.script().replace("def silu", "")

    data = _rand(3, 7, 160) * 6
    out = _lower_and_run(lambda bb, v: relax.op.nn.silu(v[0]), [((3, "t", 160), data)],
                         {"Elementwise": 1})
    np.testing.assert_allclose(out, data / (1 + np.exp(-data)), rtol=1e-5, atol=1e-6)


def test_take_clips_indices_past_the_table():
    """Embedding lookups import as take(mode="fast"); graft builds them clipped, so a token id
    past the vocabulary reads the last row instead of memory beyond the table."""
    table = _rand(50, 24)
    ids = np.array([[0, 7, 49], [3, 50, 4000]], dtype="int64")
    out = _lower_and_run(lambda bb, v: relax.op.take(v[0], v[1], axis=0),
                         [((50, 24), table), ((2, "t"), ids)], {"Elementwise": 1})
    np.testing.assert_array_equal(out, table[np.minimum(ids, 49)])


@pytest.mark.parametrize("n", [1, 15, 16, 129])
def test_softmax_over_symbolic_length(n):
    """Attention scores over a cache of any length: graft's row kernel (whole vectors plus a
    scalar tail), with masked (-inf) entries, against numpy."""
    x = (_rand(2, 3, 5, n) * 4).astype("float32")
    x[..., 0] = -np.inf if n > 1 else x[..., 0]
    out = _lower_and_run(lambda bb, v: relax.op.nn.softmax(v[0], axis=-1),
                         [(("b", 3, "t", "n"), x)], {"RowSoftmax": 1, "Elementwise": 2})
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
