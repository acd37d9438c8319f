"""The Relax rewrites the CPU lowering applies before legalization, in the Before/After form,
plus a numeric check of weight pre-transposition against numpy."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from graft.codegen.rewrites.matmul_broadcast import MatmulBroadcastWeight
from graft.codegen.rewrites.prepack_weights import PrepackWeights
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
