"""The Relax rewrites the CPU lowering applies around legalization and scheduling, in the
Before/After form, plus numeric checks of the weight layouts against numpy."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from graft.codegen.rewrites.fused_attention import FusedAttention
from graft.codegen.rewrites.grouped_attention import GroupedQueryAttention
from graft.codegen.rewrites.injective_copies import MarkInjectiveKernels
from graft.codegen.rewrites.layout_free_weights import MarkLayoutFreeWeights
from graft.codegen.rewrites.matmul_broadcast import MatmulBroadcastWeight
from graft.codegen.rewrites.prepack_weights import PrepackWeights
from graft.codegen.rewrites.symbolic_softmax import SymbolicSoftmax
from graft.frontend.imported import FunctionSignature
from graft.passes.pipeline import CompileState


def test_matmul_of_broadcast_weight_reads_the_weight():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((8, 16, 4), "float32"), w: R.Tensor((4, 6), "float32")):
            with R.dataflow():
                wb = R.broadcast_to(w, R.shape([8, 4, 6]))
                y = R.matmul(x, wb)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((8, 16, 4), "float32"), w: R.Tensor((4, 6), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    after = relax.transform.DeadCodeElimination()(MatmulBroadcastWeight()(Before))
    tvm.ir.assert_structural_equal(after, Expected)


def test_broadcast_that_adds_batch_rows_is_kept():
    """x has batch 1 and the broadcast makes 8: dropping it would change the output shape."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16, 4), "float32"), w: R.Tensor((4, 6), "float32")):
            with R.dataflow():
                wb = R.broadcast_to(w, R.shape([8, 4, 6]))
                y = R.matmul(x, wb)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(MatmulBroadcastWeight()(Before), Before)


REPEATED_KV = """
@I.ir_module
class RepeatedKV:
    @R.function
    def main(q: R.Tensor((1, 6, {t}, 8), "float32"), k: R.Tensor((1, 2, "s", 8), "float32"),
             v: R.Tensor((1, 2, "s", 8), "float32")):
        s = T.int64()
        with R.dataflow():
            ke = R.expand_dims(k, axis=[2])
            kb = R.broadcast_to(ke, R.shape([1, 2, 3, s, 8]))
            kr = R.reshape(kb, R.shape([1, 6, s, 8]))
            kt = R.permute_dims(kr, axes=[0, 1, 3, 2])
            scores = R.matmul(q, kt)
            p = R.nn.softmax(scores, axis=-1)
            ve = R.expand_dims(v, axis=[2])
            vb = R.broadcast_to(ve, R.shape([1, 2, 3, s, 8]))
            vr = R.reshape(vb, R.shape([1, 6, s, 8]))
            out = R.matmul(p, vr)
            R.output(out)
        return out
"""


def _repeated_kv(t):
    """transformers' attention with 2 kv heads shared by 6 query heads (repeat_kv), t queries
    (a number, or a name for a symbolic count)."""
    return tvm.script.from_source(REPEATED_KV.format(t=repr(t)),
                                  extra_vars={"I": I, "R": R, "T": T})


def test_grouped_query_attention_reads_each_kv_head_once():
    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((1, 6, 5, 8), "float32"), k: R.Tensor((1, 2, "s", 8), "float32"),
                 v: R.Tensor((1, 2, "s", 8), "float32")):
            s = T.int64()
            with R.dataflow():
                qg = R.reshape(q, R.shape([1, 2, 3, 5, 8]))
                kg = R.reshape(k, R.shape([1, 2, 1, s, 8]))
                kt = R.permute_dims(kg, axes=[0, 1, 2, 4, 3])
                sg = R.matmul(qg, kt)
                scores = R.reshape(sg, R.shape([1, 6, 5, s]))
                p = R.nn.softmax(scores, axis=-1)
                pg = R.reshape(p, R.shape([1, 2, 3, 5, s]))
                vg = R.reshape(v, R.shape([1, 2, 1, s, 8]))
                og = R.matmul(pg, vg)
                out = R.reshape(og, R.shape([1, 6, 5, 8]))
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(GroupedQueryAttention()(_repeated_kv(5)), Expected)


def test_grouped_query_attention_keeps_a_symbolic_number_of_queries():
    """Prefill (symbolic query count): the grouped product splits into too few tasks."""
    before = _repeated_kv("t")
    tvm.ir.assert_structural_equal(GroupedQueryAttention()(before), before)


def test_grouped_query_attention_computes_the_repeated_product():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype("float32")
               for shape in ((1, 6, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)  # query head h reads kv head h // 3
    scores = q @ kr.transpose(0, 1, 3, 2)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ vr
    grouped = GroupedQueryAttention()(_repeated_kv(5))
    assert "broadcast_to" not in grouped.script()  # the repeated copy is gone
    lib = tvm.compile(grouped, target="llvm")
    vm = relax.VirtualMachine(lib, tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (q, k, v))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_broadcast_other_than_repeat_kv_is_kept():
    """The broadcast repeats along a new axis after the sequence: not a kv-head repeat."""
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 6, 4, 8), "float32"), k: R.Tensor((1, 2, 4, 8), "float32")):
            with R.dataflow():
                ke = R.expand_dims(k, axis=[3])
                kb = R.broadcast_to(ke, R.shape([1, 2, 4, 3, 8]))
                kr = R.reshape(kb, R.shape([1, 6, 4, 8]))
                kt = R.permute_dims(kr, axes=[0, 1, 3, 2])
                scores = R.matmul(q, kt)
                R.output(scores)
            return scores

    tvm.ir.assert_structural_equal(GroupedQueryAttention()(Before), Before)


def _state(mod, weights):
    names = list(weights)
    signature = FunctionSignature(inputs=[], outputs=[], params=names)
    return CompileState(mod, dict(weights), {"main": signature})


def test_transposed_weight_becomes_a_transposed_parameter():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((6, 4), "float32")):
            with R.dataflow():
                wt = R.permute_dims(w, axes=[1, 0])
                y = R.matmul(x, wt)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w_T: R.Tensor((4, 6), "float32")):
            with R.dataflow():
                y = R.matmul(x, w_T)
                R.output(y)
            return y

    w = np.arange(24, dtype="float32").reshape(6, 4)
    state = _state(Before, {"w": w})
    did = PrepackWeights().run(state)
    tvm.ir.assert_structural_equal(state.mod, Expected)
    assert did == {"transposed": 1, "kept_original": 0}
    assert state.signatures["main"].params == ["w.T"] and list(state.params) == ["w.T"]
    np.testing.assert_array_equal(state.params["w.T"], w.T)


def test_tied_weight_keeps_both_layouts():
    """An embedding table also used as the output head: the gather still reads W."""
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((3,), "int64"), w: R.Tensor((10, 4), "float32")):
            with R.dataflow():
                h = R.take(w, ids, axis=0)
                wt = R.permute_dims(w, axes=[1, 0])
                y = R.matmul(h, wt)
                R.output(y)
            return y

    w = np.random.default_rng(0).standard_normal((10, 4)).astype("float32")
    state = _state(Before, {"w": w})
    assert PrepackWeights().run(state) == {"transposed": 1, "kept_original": 1}
    assert state.signatures["main"].params == ["w", "w.T"]

    from graft.codegen.build import build, lowering_entries
    from graft.codegen.target import resolve_target
    from graft.passes.pipeline import run_pipeline

    target = state.target = resolve_target("cpu")
    run_pipeline(state, lowering_entries(target))
    vm = relax.VirtualMachine(build(state.mod, target), tvm.cpu())
    ids = np.array([1, 7, 3], dtype="int64")
    got = vm["main"](tvm.runtime.tensor(ids), *[tvm.runtime.tensor(state.params[n])
                                                for n in state.signatures["main"].params])
    np.testing.assert_allclose(got.numpy(), w[ids] @ w.T, rtol=1e-5, atol=1e-5)


def _with_pattern(pattern):
    @I.ir_module
    class Module:
        @T.prim_func(private=True, s_tir=True)
        def take(past: T.Buffer((T.int64(4), T.int64(3), T.int64(8)), "float32"),
                 index: T.Buffer((), "int64"),
                 out: T.Buffer((T.int64(3), T.int64(8)), "float32")):
            T.func_attr({"op_pattern": pattern, "tirx.noalias": True})
            for i, j in T.grid(T.int64(3), T.int64(8)):
                with T.sblock("T_take"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    out[vi, vj] = past[T.min(T.max(T.int64(0), index[()]), T.int64(3)), vi, vj]

        @T.prim_func(private=True, s_tir=True)
        def row_sum(x: T.Buffer((T.int64(3), T.int64(8)), "float32"),
                    out: T.Buffer((T.int64(3),), "float32")):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True})
            for i, j in T.grid(T.int64(3), T.int64(8)):
                with T.sblock("sum"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    with T.init():
                        out[vi] = T.float32(0)
                    out[vi] = out[vi] + x[vi, vj]

    return Module


def test_opaque_copy_kernel_is_marked_injective():
    """A gather TVM left opaque becomes injective; a reduction left opaque stays opaque."""
    after = MarkInjectiveKernels()(_with_pattern(8))
    assert int(after["take"].attrs["op_pattern"]) == 2
    assert int(after["row_sum"].attrs["op_pattern"]) == 8
    tvm.ir.assert_structural_equal(after, _with_pattern(2))


def test_cache_layer_take_fuses_into_concatenate():
    """past[i] ++ new along a symbolic length (a decode step's KV append): one kernel, not a
    take copy followed by a concatenate copy; the result equals numpy's."""
    from graft.codegen import build as codegen
    from graft.codegen.target import resolve_target
    from graft.passes.pipeline import run_pipeline

    @I.ir_module
    class Append:
        @R.function
        def main(past: R.Tensor((4, 1, 3, "p", 8), "float32"),
                 new: R.Tensor((1, 3, 1, 8), "float32")):
            with R.dataflow():
                layer = R.take(past, R.const(2, "int64"), axis=0)
                out = R.concat((layer, new), axis=2)
                R.output(out)
            return out

    target = resolve_target("cpu")
    state = CompileState(Append, {}, {}, target=target)
    run_pipeline(state, codegen.lowering_entries(target))
    kernels = [gv.name_hint for gv, f in state.mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == ["fused_take_concatenate"], kernels
    rng = np.random.default_rng(0)
    past, new = rng.standard_normal((4, 1, 3, 5, 8), "float32"), \
        rng.standard_normal((1, 3, 1, 8), "float32")
    vm = relax.VirtualMachine(codegen.build(state.mod, target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(past), tvm.runtime.tensor(new)).numpy()
    np.testing.assert_array_equal(got, np.concatenate([past[2], new], axis=2))


def _softmax_module(length):
    return tvm.script.from_source("""
@I.ir_module
class Scores:
    @R.function
    def main(s: R.Tensor((1, 9, "t", {n}), "float32")):
        with R.dataflow():
            p = R.nn.softmax(s, axis=-1)
            R.output(p)
        return p
""".format(n=repr(length)), extra_vars={"I": I, "R": R, "T": T})


def test_softmax_over_symbolic_length_calls_the_row_kernel():
    after = SymbolicSoftmax()(_softmax_module("n"))
    kernels = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [str(f.attrs["graft.schedule_rule"]) for f in kernels] == ["RowSoftmax"]
    text = after["main"].script()
    assert "R.nn.softmax" not in text and text.count("R.reshape") == 2, text


def test_softmax_over_static_length_is_kept():
    before = _softmax_module(128)
    tvm.ir.assert_structural_equal(SymbolicSoftmax()(before), before)


def _weight_kernels(layout_free=None):
    attrs = {"tirx.noalias": True}
    if layout_free is not None:
        attrs["layout_free_buffers"] = layout_free

    @I.ir_module
    class Module:
        @T.prim_func(private=True, s_tir=True)
        def scale(x: T.Buffer((T.int64(2), T.int64(4)), "float32"),
                  w: T.Buffer((T.int64(2), T.int64(4)), "float32"),
                  out: T.Buffer((T.int64(2), T.int64(4)), "float32")):
            T.func_attr(attrs)
            for i, j in T.grid(T.int64(2), T.int64(4)):
                with T.sblock("scale"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    out[vi, vj] = x[vi, vj] * w[vi, vj]

        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((2, 4), "float32")):
            cls = Module
            with R.dataflow():
                y = R.call_tir(cls.scale, (x, w), out_ty=R.Tensor((2, 4), "float32"))
                z = R.call_tir(cls.scale, (y, w), out_ty=R.Tensor((2, 4), "float32"))
                R.output(z)
            return z

    return Module


def test_kernels_learn_which_inputs_are_weights():
    """A kernel input that is a weight at every call is layout-free; one that is not at
    some call (here the first input: x, then y) is not."""
    state = CompileState(_weight_kernels(), {"w": np.ones((2, 4), "float32")},
                         {"main": FunctionSignature(inputs=[], outputs=[], params=["w"])})
    assert MarkLayoutFreeWeights().run(state) == {"kernels": 1}
    tvm.ir.assert_structural_equal(state.mod, _weight_kernels(layout_free=[1]))


def test_weight_panels_made_once_for_prefill_and_decode():
    """The Matmul rule (symbolic rows) and the GEMV rule (one row) read a weight [K, N] as
    [N/48, K, 48] panels; the panels are made at compile time and stored once, in place of the
    weight. A weight whose columns make no whole panel stays as it is. Both functions equal
    numpy's product."""
    from graft.codegen.build import build, lowering_entries
    from graft.codegen.target import resolve_target
    from graft.passes.pipeline import run_pipeline

    @I.ir_module
    class Model:
        @R.function
        def prefill(x: R.Tensor(("m", 64), "float32"), w: R.Tensor((64, 96), "float32"),
                    v: R.Tensor((96, 77), "float32")):
            with R.dataflow():
                y = R.matmul(R.matmul(x, w), v)
                R.output(y)
            return y

        @R.function
        def decode(x: R.Tensor((1, 64), "float32"), w: R.Tensor((64, 96), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    rng = np.random.default_rng(0)
    w, v = rng.standard_normal((64, 96), "float32"), rng.standard_normal((96, 77), "float32")
    target = resolve_target("cpu")
    state = CompileState(Model, {"w": w, "v": v}, {
        "prefill": FunctionSignature(inputs=[], outputs=[], params=["w", "v"]),
        "decode": FunctionSignature(inputs=[], outputs=[], params=["w"])}, target=target)
    records = run_pipeline(state, lowering_entries(target))
    assert {r["pass"]: r["did"] for r in records}["fold_weight_layouts"] == \
        {"weights": 1, "copies": 1}
    assert state.signatures["prefill"].params == ["v", "w.panels"]
    assert state.signatures["decode"].params == ["w.panels"]
    assert sorted(state.params) == ["v", "w.panels"]
    np.testing.assert_array_equal(state.params["w.panels"],
                                  w.reshape(64, 2, 48).transpose(1, 0, 2))
    vm = relax.VirtualMachine(build(state.mod, target), tvm.cpu())

    def run(name, x):
        params = [tvm.runtime.tensor(state.params[p]) for p in state.signatures[name].params]
        return vm[name](tvm.runtime.tensor(x), *params).numpy()

    x = rng.standard_normal((37, 64), "float32")
    np.testing.assert_allclose(run("prefill", x), x @ w @ v, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(run("decode", x[:1]), x[:1] @ w, rtol=1e-4, atol=1e-4)


PREFILL_ATTENTION = """
@I.ir_module
class Prefill:
    @R.function
    def main(q: R.Tensor((1, 4, {n}, 16), "float32"), k: R.Tensor((1, 2, "t", 16), "float32"),
             v: R.Tensor((1, 2, "t", 16), "float32"), mask: R.Tensor((1, 1, {n}, "t"), "bool")):
        t = T.int64()
        with R.dataflow():
            ke = R.expand_dims(k, axis=[2])
            kb = R.broadcast_to(ke, R.shape([1, 2, 2, t, 16]))
            kr = R.reshape(kb, R.shape([1, 4, t, 16]))
            ve = R.expand_dims(v, axis=[2])
            vb = R.broadcast_to(ve, R.shape([1, 2, 2, t, 16]))
            vr = R.reshape(vb, R.shape([1, 4, t, 16]))
            kt = R.permute_dims(kr, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            sm = R.where(mask, s, R.const({fill}, "float32"))
            p = R.nn.softmax(sm, axis=-1)
            o = R.matmul(p, vr)
            R.output(o)
        return o
"""


def _prefill_attention(fill=-3.4028234663852886e38, queries=None):
    """The attention block over `queries` (static) query rows, or a symbolic number."""
    n = '"n"' if queries is None else str(queries)
    return tvm.script.from_source(PREFILL_ATTENTION.format(fill=repr(fill), n=n),
                                  extra_vars={"I": I, "R": R, "T": T})


def test_prefill_attention_becomes_one_kernel():
    """Scores, mask, softmax and context over repeat_kv copies: one call of graft's attention
    kernel on the unrepeated keys and values."""
    from graft.codegen.cpu.attention import attention_func

    before = _prefill_attention()
    n, t = tvm.tirx.Var("n", "int64"), tvm.tirx.Var("t", "int64")
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([1, 4, n, 16], "float32"))
    k = relax.Var("k", relax.TensorType([1, 2, t, 16], "float32"))
    v = relax.Var("v", relax.TensorType([1, 2, t, 16], "float32"))
    mask = relax.Var("mask", relax.TensorType([1, 1, n, t], "bool"))
    with bb.function("main", [q, k, v, mask]):
        with bb.dataflow():
            kernel = bb.add_func(attention_func(4, 2, 16), "attention_4x2x16")
            out = bb.emit_output(relax.call_tir(kernel, [q, k, v, mask],
                                                relax.TensorType([1, 4, n, 16], "float32")))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(FusedAttention()(before), bb.get())


def test_attention_with_a_mild_mask_fill_is_kept():
    """where(mask, s, -100) still gives masked keys weight: not the kernel's semantics."""
    before = _prefill_attention(fill=-100.0)
    tvm.ir.assert_structural_equal(FusedAttention()(before), before)


def _compiled_attention(queries=None):
    """The attention block through graft's lowering: (VM, names of its kernels)."""
    from graft.codegen import build as codegen
    from graft.codegen.target import resolve_target
    from graft.passes.pipeline import run_pipeline

    target = resolve_target("cpu")
    state = CompileState(_prefill_attention(queries=queries), {}, {}, target=target)
    run_pipeline(state, codegen.lowering_entries(target))
    kernels = [gv.name_hint for gv, f in state.mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    return relax.VirtualMachine(codegen.build(state.mod, target), tvm.cpu()), kernels


def _attention_mask(kind: str, n: int, past: int, rng) -> np.ndarray:
    t = past + n
    if kind == "causal":
        mask = np.arange(t)[None, :] <= np.arange(n)[:, None] + past
    elif kind == "random":
        mask = rng.random((n, t)) > 0.5
    else:  # row 0 sees nothing, the others the first 5 keys
        mask = np.zeros((n, t), bool)
        mask[1:, :5] = True
    return mask[None, None]


def _attention_reference(q, k, v, mask):
    s = q @ np.repeat(k, 2, axis=1).transpose(0, 1, 3, 2)
    s = np.where(mask, s, np.float32(-3.4028234663852886e38))
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ np.repeat(v, 2, axis=1)


def _check_attention(vm, n: int, past: int, kind: str, rng) -> None:
    t = past + n
    q = rng.standard_normal((1, 4, n, 16), "float32")
    k, v = rng.standard_normal((2, 1, 2, t, 16), "float32")
    mask = _attention_mask(kind, n, past, rng)
    got = vm["main"](*[tvm.runtime.tensor(x) for x in (q, k, v, mask)]).numpy()
    np.testing.assert_allclose(got, _attention_reference(q, k, v, mask), rtol=1e-4, atol=1e-5,
                               err_msg=f"n={n} past={past} {kind}")


def test_fused_attention_equals_numpy():
    """Causal, with a past, random masks, rows masked everywhere, lengths off the blocks:
    the compiled prefill attention equals the unfused computation in numpy."""
    vm, kernels = _compiled_attention()
    assert kernels == ["attention_4x2x16"]
    rng = np.random.default_rng(0)
    for n, past, kind in [(70, 0, "causal"), (5, 61, "causal"), (9, 3, "random"),
                          (1, 130, "causal"), (6, 17, "empty rows")]:
        _check_attention(vm, n, past, kind, rng)


@pytest.mark.parametrize("queries", [1, 3])
def test_decode_attention_equals_numpy(queries):
    """A static handful of query rows (a decode step; 3: a short draft) gets the decode
    kernel, which equals numpy over cache lengths on and off its 16-key blocks, random masks
    and rows masked everywhere."""
    vm, kernels = _compiled_attention(queries)
    assert kernels == [f"decode_attention_4x2x16x{queries}"]
    rng = np.random.default_rng(1)
    for past, kind in [(0, "causal"), (15, "causal"), (16, "random"), (129, "causal"),
                       (40, "random"), (6, "empty rows")]:
        _check_attention(vm, queries, past, kind, rng)


@I.ir_module(check_well_formed=False)
class FusedWindowBefore:
    """What FuseOps leaves for a window of run-time length: the fused group that reads the
    size n is called before the match_cast that defines n."""

    @R.function(private=True)
    def fused(x: R.Tensor((), "float32"), sizes: R.Shape(["n"])) -> R.Tensor(("n",), "float32"):
        n = T.int64()
        R.func_attr({"Primitive": True})
        with R.dataflow():
            ramp = R.arange(0, n, 1, "float32")
            gv = R.multiply(ramp, x)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((), "float32"), length: R.Tensor((1,), "int64")):
        n = T.int64()
        cls = FusedWindowBefore
        with R.dataflow():
            y = cls.fused(x, R.shape([n]))
            s = R.tensor_to_shape(length)
            s1 = R.match_cast(s, R.Shape([n]))
            R.output(y)
        return y


@I.ir_module
class FusedWindowAfter:
    @R.function(private=True)
    def fused(x: R.Tensor((), "float32"), sizes: R.Shape(["n"])) -> R.Tensor(("n",), "float32"):
        n = T.int64()
        R.func_attr({"Primitive": True})
        with R.dataflow():
            ramp = R.arange(0, n, 1, "float32")
            gv = R.multiply(ramp, x)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((), "float32"), length: R.Tensor((1,), "int64")):
        n = T.int64()
        cls = FusedWindowAfter
        with R.dataflow():
            s = R.tensor_to_shape(length)
            s1 = R.match_cast(s, R.Shape([n]))
            y = cls.fused(x, R.shape([n]))
            R.output(y)
        return y


def test_fused_call_moves_after_the_match_cast_of_its_size():
    from graft.codegen.rewrites.symbolic_var_order import OrderAfterMatchCast

    with pytest.raises(Exception, match="not defined"):
        relax.analysis.well_formed(FusedWindowBefore)
    after = OrderAfterMatchCast()(FusedWindowBefore)
    tvm.ir.assert_structural_equal(after, FusedWindowAfter)
    relax.analysis.well_formed(after)  # raises if not
