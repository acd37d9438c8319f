"""Sparsify (structured pruning of feed-forward channels): the rewrite in the Before/After
form, and compiled models against PyTorch references built by hand with the same channels
removed."""

import numpy as np
import pytest
import torch
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import graft
from graft import passes as P
from graft.frontend.imported import FunctionSignature, TensorSpec
from graft.passes.pipeline import CompileState
from graft.runtime.errors import GraftError, PassError


def test_shrinks_the_intermediate_dimension_of_a_feed_forward_block():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w_up: R.Tensor((16, 8), "float32"),
                 b_up: R.Tensor((16,), "float32"), w_down: R.Tensor((8, 16), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.permute_dims(w_up, axes=None)
                h = R.matmul(x, t, out_dtype="float32")
                hb = R.add(h, b_up)
                a = R.nn.gelu(hb)
                td = R.permute_dims(w_down, axes=None)
                y = R.matmul(a, td, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w_up: R.Tensor((8, 8), "float32"),
                 b_up: R.Tensor((8,), "float32"), w_down: R.Tensor((8, 8), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.permute_dims(w_up, axes=None)
                h = R.matmul(x, t, out_dtype="float32")
                hb = R.add(h, b_up)
                a = R.nn.gelu(hb)
                td = R.permute_dims(w_down, axes=None)
                y = R.matmul(a, td, out_dtype="float32")
                R.output(y)
            return y

    gen = np.random.default_rng(0)
    params = {"w_up": gen.standard_normal((16, 8)).astype(np.float32),
              "b_up": gen.standard_normal(16).astype(np.float32),
              "w_down": gen.standard_normal((8, 16)).astype(np.float32)}
    params["w_up"][::2] *= 10  # even channels matter most by magnitude
    signature = FunctionSignature([TensorSpec("x", [2, 8], "float32")],
                                  [TensorSpec("y", [2, 8], "float32")], list(params))
    state = CompileState(Before, dict(params), {"main": signature})
    did = P.Sparsify(ratio=0.5, multiple=4).run(state)
    tvm.ir.assert_structural_equal(state.mod, Expected)
    np.testing.assert_array_equal(state.params["w_up"], params["w_up"][::2])
    np.testing.assert_array_equal(state.params["b_up"], params["b_up"][::2])
    np.testing.assert_array_equal(state.params["w_down"], params["w_down"][:, ::2])
    assert did["layers"]["w_down"] == {"channels": 16, "kept": 8, "sparsity": 0.5,
                                       "up": ["w_up"]}


class FFN(torch.nn.Module):
    def __init__(self, d=64, hidden=256, gated=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gated = gated
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, hidden)
        self.gate = torch.nn.Linear(d, hidden, bias=False) if gated else None
        self.down = torch.nn.Linear(hidden, d)

    def hidden(self, y, kept=None):
        if kept is None:
            up, gate = self.up(y), self.gate(y) if self.gated else None
        else:
            up = y @ self.up.weight[kept].T + self.up.bias[kept]
            gate = y @ self.gate.weight[kept].T if self.gated else None
        return torch.nn.functional.silu(gate) * up if self.gated else \
            torch.nn.functional.gelu(up)

    def forward(self, x):
        return x + self.down(self.hidden(self.norm(x)))

    def pruned(self, x, kept):
        """The block with only channels `kept`, computed by hand."""
        return x + self.hidden(self.norm(x), kept) @ self.down.weight[:, kept].T + self.down.bias


@pytest.mark.parametrize("gated", [False, True])
def test_pruned_model_matches_torch_with_the_same_channels_removed(tmp_path, gated):
    model = FFN(gated=gated).eval()
    x = torch.randn(2, 8, 64)
    compiled = graft.compile(model, (x,), passes=[P.Sparsify("ffn_channels", ratio=0.5)])
    compiled.save(tmp_path / "art")
    got = graft.load(tmp_path / "art")(x.numpy())
    with torch.no_grad():  # magnitude importance: row norms of the up weights x column norms
        w_up = model.up.weight.numpy()
        norms = np.linalg.norm(w_up, axis=1)
        if gated:
            norms = np.sqrt(norms * np.linalg.norm(model.gate.weight.numpy(), axis=1))
        importance = norms * np.linalg.norm(model.down.weight.numpy(), axis=0)
        kept = np.sort(np.argsort(-importance)[:128])
        expected = model.pruned(x, kept).numpy()
        full = model(x).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - full).max() > 1e-2  # really pruned
    shapes = {n: a.shape for n, a in compiled.params.items()}
    assert sum(np.prod(s) for s in shapes.values()) < sum(
        p.numel() for p in model.parameters()) * 0.6
    did = compiled.manifest["passes"][0]["did"]
    assert did["sparsity"] == 0.5 and did["importance"] == "magnitude"


def redundant_model():
    """An FFN whose last 64 channels copy the first 64, with smaller down columns (so they
    rank last): they can go with no error once the kept channel's down column takes over its
    copy's (what the refit finds)."""
    model = FFN(hidden=128, seed=1).eval()
    with torch.no_grad():
        model.up.weight[64:] = model.up.weight[:64]
        model.up.bias[64:] = model.up.bias[:64]
        model.down.weight[:, :64] *= 4
    return model


def calibration(count=8, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 16, 64, generator=gen).numpy(),) for _ in range(count)]


def test_least_squares_refit_recovers_removed_copies(tmp_path):
    model = redundant_model()
    x = torch.randn(4, 16, 64)
    outs = {}
    for correct in (True, False):
        compiled = graft.compile(model, (x,), calibration=calibration(), passes=[
            P.Sparsify(ratio=0.5, correct=correct)])
        compiled.save(tmp_path / f"art{correct}")
        outs[correct] = graft.load(tmp_path / f"art{correct}")(x.numpy())
    with torch.no_grad():
        full = model(x).numpy()
    refit, plain = (np.abs(outs[c] - full).max() for c in (True, False))
    assert refit < 1e-2 * np.abs(full).max()  # the ridge term shrinks the fit a little
    assert plain > 10 * refit


def test_budget_search_removes_what_the_budget_allows_and_records_it():
    model = redundant_model()
    x = torch.randn(4, 16, 64)
    compiled = graft.compile(model, (x,), calibration=calibration(),
                             passes=[P.Sparsify(budget="cosine>=0.999")])
    did = compiled.manifest["passes"][0]["did"]
    assert did["budget"] == "cosine>=0.999" and did["held_out_value"] >= 0.999
    assert did["importance"] == "activation" and did["corrected"]
    assert did["sparsity"] >= 0.5  # the copies at least
    strict = graft.compile(FFN(hidden=128, seed=4).eval(), (x,), calibration=calibration(),
                           passes=[P.Sparsify(budget="cosine>=0.9999999")])
    assert strict.manifest["passes"][0]["did"]["sparsity"] == 0  # nothing can go


def test_bad_requests_are_refused():
    with pytest.raises(GraftError, match="ratio .* or an accuracy budget"):
        P.Sparsify("ffn_channels")
    with pytest.raises(GraftError, match="pattern 'heads' is not known"):
        P.Sparsify("heads", ratio=0.5)
    with pytest.raises(GraftError, match="ratio 1.5"):
        P.Sparsify(ratio=1.5)
    x = torch.randn(2, 8, 64)
    with pytest.raises(PassError, match="need calibration data"):
        graft.compile(FFN().eval(), (x,), passes=[P.Sparsify(budget="cosine>=0.9")])
    with pytest.raises(PassError, match="no feed-forward block"):
        graft.compile(torch.nn.Linear(64, 64).eval(), (x,), passes=[P.Sparsify(ratio=0.5)])
