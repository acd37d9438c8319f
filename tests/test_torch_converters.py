"""graft's torch converters (frontend/torch_converters.py): programs import as exported, without
torch's decomposition retrace, and match PyTorch eager."""

import pytest
import torch
import torch.nn.functional as F

import graft

from conftest import max_abs


@pytest.fixture
def no_decomposition(monkeypatch):
    """Fail if the import falls back to ExportedProgram.run_decompositions."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("run_decompositions was called")

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", refuse)


def compile_and_load(module, example, dynamic_shapes, tmp_path):
    compiled = graft.compile(module, example, dynamic_shapes=dynamic_shapes)
    compiled.save(tmp_path / "art")
    return graft.load(tmp_path / "art")


class Attention(torch.nn.Module):
    """q, k, v: [batch, heads, seq, 16]; mask built inside, as transformers does."""

    def __init__(self, mask_kind, kv_heads=4, scale=None):
        super().__init__()
        self.mask_kind, self.kv_heads, self.scale = mask_kind, kv_heads, scale

    def forward(self, q, k, v, keep):
        kwargs = {"scale": self.scale} if self.scale is not None else {}
        if self.kv_heads != q.shape[1]:
            kwargs["enable_gqa"] = True
        if self.mask_kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        mask = keep.to(device=q.device, dtype=torch.bool)[:, None, None, :]
        mask = mask & q.new_ones((), dtype=torch.bool)
        if self.mask_kind == "float":
            mask = torch.where(mask, 0.0, -1e4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


@pytest.mark.parametrize("mask_kind,kv_heads,scale", [
    ("bool", 4, None), ("float", 4, 0.3), ("causal", 4, None), ("bool", 2, None),
    ("causal", 1, 0.5)])
def test_attention_matches_pytorch(no_decomposition, tmp_path, mask_kind, kv_heads, scale):
    module = Attention(mask_kind, kv_heads, scale)
    seq = torch.export.Dim("seq", min=2, max=64)

    def inputs(batch, length):
        gen = torch.Generator().manual_seed(length)
        q = torch.randn(batch, 4, length, 16, generator=gen)
        k, v = (torch.randn(batch, kv_heads, length, 16, generator=gen) for _ in range(2))
        keep = torch.ones(batch, length, dtype=torch.long)
        keep[-1, length // 2:] = 0  # padding in the last row
        return q, k, v, keep

    dims = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "keep": {1: seq}}
    runtime = compile_and_load(module, inputs(2, 6), dims, tmp_path)
    for batch, length in ((2, 6), (2, 17), (2, 64)):
        args = inputs(batch, length)
        with torch.no_grad():
            expected = module(*args).numpy()
        assert max_abs(runtime(*args), expected) < 1e-5, (mask_kind, length)


def test_slice_of_a_buffer_by_a_bounded_length_keeps_its_shape(no_decomposition, tmp_path):
    class PositionEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("positions", torch.arange(32).unsqueeze(0))
            self.table = torch.nn.Embedding(32, 8)

        def forward(self, x):  # x: [batch, seq, 8]
            y = x + self.table(self.positions[:, :x.shape[1]])
            return y.view(x.shape[0], x.shape[1], -1, 4).sum(-1)

    module = PositionEmbedding().eval()
    dims = {"x": {0: torch.export.Dim("batch", max=8), 1: torch.export.Dim("seq", max=32)}}
    runtime = compile_and_load(module, (torch.randn(2, 5, 8),), dims, tmp_path)
    for shape in ((1, 3, 8), (4, 32, 8)):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = module(x).numpy()
        assert max_abs(runtime(x), expected) < 1e-5


def test_dtype_of_new_ones_is_kept(no_decomposition, tmp_path):
    class Masked(torch.nn.Module):
        def forward(self, x):
            keep = x.new_ones(x.shape, dtype=torch.bool) & (x > 0)
            return torch.where(keep, x, x.new_zeros(x.shape, dtype=torch.float32) - 1)

    runtime = compile_and_load(Masked(), (torch.randn(3, 4),), None, tmp_path)
    x = torch.randn(3, 4)
    assert max_abs(runtime(x), Masked()(x).numpy()) == 0


def test_last_positions_slice_has_a_static_length(no_decomposition, tmp_path):
    """`hidden[:, -1:]` (transformers' logits_to_keep) must stay one row long, so the head after
    it is a matrix-vector product."""
    class LastTokenHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 5, bias=False)

        def forward(self, x):  # x: [batch, seq, 8]
            return self.head(x[:, -1:, :])

    module = LastTokenHead().eval()
    dims = {"x": {1: torch.export.Dim("seq", min=1, max=64)}}
    compiled = graft.compile(module, (torch.randn(2, 6, 8),), dynamic_shapes=dims)
    compiled.save(tmp_path / "art")
    runtime = graft.load(tmp_path / "art")
    assert [str(s) for s in runtime.outputs] == ["output:2x1x5:float32"]
    for seq in (1, 9):
        x = torch.randn(2, seq, 8)
        with torch.no_grad():
            assert max_abs(runtime(x), module(x).numpy()) < 1e-5


class RepeatedKV(torch.nn.Module):
    """Grouped-query attention as transformers writes it: key/value heads repeated (repeat_kv)
    before SDPA with a causal boolean mask."""

    def forward(self, q, k, v):
        batch, kv_heads, length, dim = k.shape
        groups = q.shape[1] // kv_heads

        def repeat_kv(t):
            return t[:, :, None, :, :].expand(batch, kv_heads, groups, length, dim) \
                .reshape(batch, kv_heads * groups, length, dim)

        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask)


def test_attention_with_repeated_kv_heads(no_decomposition, tmp_path):
    seq = torch.export.Dim("seq", min=2, max=64)
    dims = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}}
    example = (torch.randn(1, 6, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    runtime = compile_and_load(RepeatedKV(), example, dims, tmp_path)
    for length in (2, 33):
        args = (torch.randn(1, 6, length, 16), torch.randn(1, 2, length, 16),
                torch.randn(1, 2, length, 16))
        with torch.no_grad():
            expected = RepeatedKV()(*args).numpy()
        assert max_abs(runtime(*args), expected) < 1e-5


def test_attention_dropout_is_refused_by_name():
    class Dropping(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    with pytest.raises(graft.GraftError, match="dropout_p=0.1"):
        graft.compile(Dropping(), (torch.randn(1, 2, 4, 8),))


@pytest.mark.parametrize("affine", [True, False])
def test_eval_mode_batch_norm_uses_running_statistics(no_decomposition, tmp_path, affine):
    """torch.export writes `batch_norm.default`; TVM's converter read its training flag as the
    momentum and ran with batch statistics and eps 0.1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6, affine=affine))
    with torch.no_grad():  # statistics far from the batch's own, so the two modes differ
        model[1].running_mean.uniform_(-2, 2)
        model[1].running_var.uniform_(0.5, 4)
        if affine:
            model[1].weight.uniform_(0.5, 2)
            model[1].bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    runtime = compile_and_load(model, (x,), None, tmp_path)
    with torch.no_grad():
        expected = model(x).numpy()
    assert max_abs(runtime(x.numpy()), expected) < 1e-5


class Extremes(torch.nn.Module):
    def forward(self, x):
        return x.amax(dim=-1), x.amin(dim=1, keepdim=True), x.amax()


def test_amax_amin_of_infinite_rows_match_pytorch(no_decomposition, tmp_path):
    """A row that is all -inf (a fully masked attention row) has max -inf, not -3.4e38."""
    inf = float("inf")
    rows = torch.tensor([[-inf, -inf, -inf], [1.0, -inf, 2.0], [inf, inf, inf]])
    loaded = compile_and_load(Extremes(), (rows,), None, tmp_path)
    for x in (rows, torch.randn(3, 3)):
        for got, want in zip(loaded(x.numpy()), Extremes()(x)):
            assert torch.equal(torch.from_numpy(got), want), (got, want)
