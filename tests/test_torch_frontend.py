"""torch.export path: modules, ExportedPrograms and .pt2 files, compared with PyTorch eager."""

import numpy as np
import pytest
import torch

import graft
from graft.runtime.errors import ModelLoadError, UnsupportedOperatorError

from conftest import max_abs


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_symbolic_batch_matches_pytorch(tiny_model, tiny_artifact, batch):
    runtime = graft.load(tiny_artifact)
    x = torch.randn(batch, 8)
    with torch.no_grad():
        expected = tiny_model(x).numpy()
    assert max_abs(runtime(x), expected) < 1e-5
    assert max_abs(runtime(x.numpy()), expected) < 1e-5


def test_signature_names_symbolic_dims(tiny_artifact):
    runtime = graft.load(tiny_artifact)
    assert [str(s) for s in runtime.inputs] == ["x:batchx8:float32"]
    assert [str(s) for s in runtime.outputs] == ["output:batchx4:float32"]


def test_exported_program_and_pt2_file(tiny_model, tmp_path):
    x = torch.randn(2, 8)
    ep = torch.export.export(tiny_model, (x,))
    torch.export.save(ep, tmp_path / "tiny.pt2")
    for source in (ep, tmp_path / "tiny.pt2", str(tmp_path / "tiny.pt2")):
        compiled = graft.compile(source)
        compiled.save(tmp_path / "art")
        out = graft.load(tmp_path / "art")(x)
        assert max_abs(out, tiny_model(x).detach().numpy()) < 1e-5


def test_dict_and_tuple_outputs_are_named(tmp_path):
    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            return {"double": x * 2, "pair": (x + 1, x.sum())}

    compiled = graft.compile(TwoHeads(), (torch.ones(2, 3),))
    compiled.save(tmp_path / "a")
    runtime = graft.load(tmp_path / "a")
    assert [s.name for s in runtime.outputs] == ["double", "pair.0", "pair.1"]
    outputs = runtime.run({"x": np.full((2, 3), 2.0, np.float32)})
    assert outputs["double"].tolist() == [[4.0] * 3] * 2
    assert float(outputs["pair.1"]) == 12.0


def test_unsupported_torch_op_names_op_and_node():
    class UsesUnsupported(torch.nn.Module):
        def forward(self, x):
            return torch.special.i1(x) + torch.special.i1e(x)

    with pytest.raises(UnsupportedOperatorError) as info:
        graft.compile(UsesUnsupported(), (torch.ones(3),))
    text = str(info.value)
    assert "special_i1.default" in text and "special_i1e.default" in text
    assert "converters=" in text  # says how to supply a converter


def test_custom_converter_supplies_a_missing_op():
    from tvm import relax

    class UsesI1(torch.nn.Module):
        def forward(self, x):
            return torch.special.i1(x)

    def i1_as_half_x(node, importer):  # a stand-in with known values: i1(x) ≈ x/2 near 0
        return importer.block_builder.emit(relax.op.multiply(
            importer.env[node.args[0]], relax.const(0.5, "float32")))

    compiled = graft.compile(UsesI1(), (torch.ones(3),),
                             converters={"special_i1.default": i1_as_half_x})
    assert compiled.manifest["functions"]["main"]["outputs"][0]["shape"] == [3]


def test_missing_and_corrupt_pt2(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        graft.compile(tmp_path / "nope.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="not a readable torch.export archive"):
        graft.compile(bad)


def test_tied_weights_are_stored_once(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = Tied().eval()
    compiled = graft.compile(model, (torch.tensor([[1, 2, 3]]),))
    # the two names import as one array; the CPU matmul reads it pre-transposed, so the
    # gather keeps the table and the head gets a transposed copy (PrepackWeights)
    assert sorted(compiled.params) == ["p_embed_weight", "p_embed_weight.T"]
    assert compiled.params["p_embed_weight.T"].shape == (4, 10)
    assert compiled.signatures["main"]["params"] == ["p_embed_weight", "p_embed_weight.T"]
    compiled.save(tmp_path / "a")
    ids = torch.tensor([[4, 0, 9]])
    assert max_abs(graft.load(tmp_path / "a")(ids), model(ids).detach().numpy()) < 1e-6


def test_negative_index_selects_from_the_end(tmp_path):
    """x[:, -1] imports as take(mode="fast"), which does not wrap negative indices."""

    class LastAndSecondLast(torch.nn.Module):
        def forward(self, x):
            return x[:, -1] * 2 + x[:, -2] - x[:, 0, -1].unsqueeze(-1)

    model = LastAndSecondLast()
    compiled = graft.compile(model, (torch.randn(2, 5, 5),),
                             dynamic_shapes={"x": {1: torch.export.Dim("seq")}})
    compiled.save(tmp_path / "a")
    runtime = graft.load(tmp_path / "a")
    for seq in (2, 5, 9):
        x = torch.randn(2, seq, 5)
        assert max_abs(runtime(x), model(x).numpy()) < 1e-6
