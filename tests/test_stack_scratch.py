"""ScratchOnStack: small `local` scratch of CPU kernels becomes stack memory, not calls to TVM's
workspace pool (Before/After), and the kernels built with graft's TIR pipeline make no such
calls per task (checked in the LLVM IR) and still compute the right thing."""

import re

import numpy as np
import tvm
from tvm.script import tirx as T

from graft.codegen.stack_scratch import STACK_LIMIT, TIR_PIPELINE, scratch_on_stack
from graft.codegen.target import resolve_target


def test_small_local_scratch_is_marked_for_the_stack():
    @T.prim_func(private=True)
    def before(a: T.Buffer((64,), "float32"), out: T.Buffer((64,), "float32")):
        for task in T.parallel(8):
            acc = T.alloc_buffer((16,), "float32", scope="local")
            big = T.alloc_buffer((STACK_LIMIT // 4 + 1,), "float32", scope="local")
            shared = T.alloc_buffer((16,), "float32")
            for i in range(8):
                acc[i] = a[task * 8 + i]
                big[i] = acc[i]
                shared[i] = big[i]
                out[task * 8 + i] = shared[i]

    @T.prim_func(private=True)
    def expected(a: T.Buffer((64,), "float32"), out: T.Buffer((64,), "float32")):
        for task in T.parallel(8):
            acc = T.alloc_buffer((16,), "float32", scope="local",
                                 annotations={"disable_lower_builtin": True})
            big = T.alloc_buffer((STACK_LIMIT // 4 + 1,), "float32", scope="local")
            shared = T.alloc_buffer((16,), "float32")
            for i in range(8):
                acc[i] = a[task * 8 + i]
                big[i] = acc[i]
                shared[i] = big[i]
                out[task * 8 + i] = shared[i]

    after = scratch_on_stack(tvm.IRModule({"f": before}))["f"]
    tvm.ir.assert_structural_equal(after, expected)


def _workspace_allocations(func, pipeline):
    mod = tvm.IRModule({"kernel": func.with_attr("global_symbol", "kernel")})
    lib = tvm.compile(mod, resolve_target("cpu"), tir_pipeline=pipeline)
    source = lib.mod.inspect_source("ll") if hasattr(lib, "mod") else lib.inspect_source("ll")
    return re.findall(r"%(\w+) = tail call ptr %\w+\(i32 1, i32 %dev_id", source), lib


def test_attention_kernel_allocates_only_its_transposed_keys():
    """The prefill attention kernel's per-task scratch (running maxima, sums, scores, the
    accumulated values, the scalars its TVMScript assigns): with TVM's own pipeline each is a
    workspace allocation per task; with graft's only the keys' transposed copy (one per
    call) is left. The output still matches numpy's softmax attention."""
    from graft.codegen.cpu.attention import attention_func

    func = attention_func(4, 2, 16)
    default_allocs, _ = _workspace_allocations(func, "default")
    assert {"acc", "score", "prob"} <= set(default_allocs)  # what the pass is for
    allocs, lib = _workspace_allocations(func, TIR_PIPELINE)
    assert allocs == ["kt"]

    rng = np.random.default_rng(0)
    b, n, t = 2, 37, 53
    q = rng.standard_normal((b, 4, n, 16), dtype=np.float32)
    k, v = (rng.standard_normal((b, 2, t, 16), dtype=np.float32) for _ in range(2))
    mask = rng.random((b, 1, n, t)) < 0.7
    out = tvm.runtime.tensor(np.zeros((b, 4, n, 16), np.float32))
    lib["kernel"](*(tvm.runtime.tensor(x) for x in (q, k, v, mask)), out)
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    scores = np.where(mask, q @ kk.transpose(0, 1, 3, 2), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), weights @ vv, rtol=1e-4, atol=1e-5)
