"""DerivedInputDims: an input size torch.export states as `2*n` becomes a size variable of its
own, with `n` defined from it at run time; numerically, a model whose export needs a derived
dim runs at several sizes from one artifact, and a size not of the form is refused."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import graft
from graft.frontend.derived_dims import DerivedInputDims
from graft.runtime.errors import GraftError

from conftest import max_abs


def test_derived_dim_gets_its_own_variable():
    # `n` appears only inside `n * 2`, which TVMScript cannot parse: build Before directly
    b, n = tirx.Var("b", "int64"), tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([b, n * 2], "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x], attrs={"tir_var_lower_bound": {"b": 1, "n": 2}}):
        with builder.dataflow():
            pairs = builder.emit(relax.op.reshape(x, [b, n, 2]))
            total = builder.emit_output(relax.op.sum(pairs, axis=[2]))
        builder.emit_func_output(total)
    before = builder.get()

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("b", "x_dim1"), "float32")) -> R.Tensor(dtype="float32", ndim=2):
            R.func_attr({"tir_var_lower_bound": {"b": 1, "n": 2, "x_dim1": 4}})
            b = T.int64()
            x_dim1 = T.int64()
            n = T.int64()
            x_shape: R.Shape([b, x_dim1]) = R.shape_of(x)
            x_shape_tensor = R.shape_to_tensor(x_shape)
            size = R.take(x_shape_tensor, R.const([1], "int64"), axis=0, mode="fast")
            n_value = R.floor_divide(size, R.const(2, "int64"))
            shape = R.tensor_to_shape(n_value)
            derived_dims = R.match_cast(shape, R.Shape([n]))
            x_1 = R.match_cast(x, R.Tensor((b, n * 2), "float32"))
            with R.dataflow():
                pairs = R.reshape(x_1, R.shape([b, n, 2]))
                total = R.sum(pairs, axis=[2])
                R.output(total)
            return total

    after = DerivedInputDims()(before)
    relax.analysis.well_formed(after)  # raises where it is not
    tvm.ir.assert_structural_equal(after, Expected)


def test_model_exported_with_a_derived_dim(tmp_path):
    """Pairs of samples summed, then the last pair dropped: `x[:, :-1]` on a symbolic dim."""

    class Pairs(torch.nn.Module):
        def forward(self, x):
            pairs = x.reshape(x.shape[0], -1, 2).sum(-1)
            return pairs[:, :-1] * 3 + pairs[:, 1:]

    model = Pairs()
    half = torch.export.Dim("half", min=2, max=500)
    dims = {"x": {0: torch.export.Dim("batch"), 1: 2 * half}}
    compiled = graft.compile(model, (torch.randn(2, 8),), dynamic_shapes=dims)
    compiled.save(tmp_path / "a")
    runtime = graft.load(tmp_path / "a")
    for batch, samples in ((1, 6), (3, 20), (2, 998)):
        x = torch.randn(batch, samples)
        got = runtime(x.numpy())
        assert got.shape == (batch, samples // 2 - 1)
        assert max_abs(got, model(x).numpy()) < 1e-5
    with pytest.raises(GraftError, match="match_cast"):
        runtime(np.zeros((1, 7), np.float32))
