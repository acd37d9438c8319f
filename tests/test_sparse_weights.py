"""Sparsify's weight patterns (BSR blocks, N:M): the sparse kernels against numpy's dense
product of the pruned weight, the storage formats, the Relax rewrite in Before/After form,
compiled models against PyTorch with weights pruned here, and the correction."""

import copy

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import graft
from graft import passes as P
from graft.codegen import sparse
from graft.codegen.target import resolve_target
from graft.frontend.imported import FunctionSignature, TensorSpec
from graft.passes.pipeline import CompileState
from graft.passes.sparsify import linear as L
from graft.runtime.errors import GraftError, PassError
from graft.runtime.session import configure_threads

TARGET = resolve_target("cpu")
GEN = np.random.default_rng(0)
# graft's N:M and unstructured kernels use AVX-512 instructions; LLVM aborts the process when
# asked to build them for a CPU without (Sparsify then keeps pruned weights dense: tested below)
HAS_SPARSE_KERNELS = sparse.sparse_kernels_available(TARGET)
needs_sparse_kernels = pytest.mark.skipif(
    not HAS_SPARSE_KERNELS,
    reason="graft's sparse kernels are AVX-512; this host's CPU lacks it")


def run_kernel(func, arrays, out_shape):
    configure_threads()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


def random_block_mask(n, k, block, density):
    keep = GEN.random((n // block[0], k // block[1])) < density
    keep[0] = False  # an empty block row
    return keep


@pytest.mark.parametrize("block", [(16, 1), (32, 4), (64, 2), (48, 3)])
@pytest.mark.parametrize("m", [1, 7, 130, "symbolic"])
def test_bsr_kernel_matches_numpy(block, m):
    rows = 45 if m == "symbolic" else m
    k, n = 3 * 4 * 16, 192
    w = GEN.standard_normal((n, k)).astype(np.float32)
    x = GEN.standard_normal((rows, k)).astype(np.float32)
    keep = random_block_mask(n, k, block, 0.3)
    dense = w * np.kron(keep, np.ones(block, bool))
    arrays = sparse.pack_bsr(w, keep, block)
    assert arrays["data"].shape == (keep.sum(), block[1], block[0])
    np.testing.assert_array_equal(sparse.unpack_bsr(arrays, (n, k)), dense)
    func = sparse.bsr_matmul_func(tvm.tirx.Var("m", "int64") if m == "symbolic" else rows,
                                  k, n, block, arrays["data"].shape[0])
    out = run_kernel(func, [x, arrays["data"], arrays["indices"], arrays["indptr"]], (rows, n))
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@needs_sparse_kernels
@pytest.mark.parametrize("p", [2, 3, 4, 8, 12])
@pytest.mark.parametrize("m", [1, 9, 64, "symbolic"])
def test_p16_kernel_matches_numpy(p, m):
    rows = 21 if m == "symbolic" else m
    k, n = 96, 160
    w = GEN.standard_normal((n, k)).astype(np.float32)
    x = GEN.standard_normal((rows, k)).astype(np.float32)
    order = np.argsort(GEN.random((n, k // 16, 16)), axis=2)[:, :, :p]
    keep = np.zeros((n, k // 16, 16), bool)
    np.put_along_axis(keep, order, True, axis=2)
    keep = keep.reshape(n, k)
    arrays = sparse.pack_p16(w, keep)
    assert arrays["values"].shape == (n // 16, k // 16, p, 16)
    assert arrays["index"].dtype == np.uint8  # two 4-bit indices a byte where p is even
    assert arrays["index"].shape == (n // 16, k // 16, p // 2 if p % 2 == 0 else p, 16)
    np.testing.assert_array_equal(sparse.unpack_p16(arrays), w * keep)
    func = sparse.p16_matmul_func(tvm.tirx.Var("m", "int64") if m == "symbolic" else rows,
                                  k, n, p)
    out = run_kernel(func, [x, arrays["values"], arrays["index"]], (rows, n))
    expected = x.astype(np.float64) @ (w * keep).T.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@needs_sparse_kernels
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("m", [1, 9, 64, "symbolic"])
def test_unstructured_kernel_matches_numpy(density, m):
    rows = 21 if m == "symbolic" else m
    k, n = 96, 160
    w = GEN.standard_normal((n, k)).astype(np.float32)
    x = GEN.standard_normal((rows, k)).astype(np.float32)
    keep = GEN.random((n, k)) < density
    arrays = sparse.pack_unstructured(w, keep)
    np.testing.assert_array_equal(sparse.unpack_unstructured(arrays, (n, k)), w * keep)
    tiles = keep.reshape(n // 16, 16, k // 16, 16).sum(axis=3).max(axis=1)  # fullest output
    assert arrays["offsets"][-1] == tiles.sum()
    func = sparse.unstructured_matmul_func(
        tvm.tirx.Var("m", "int64") if m == "symbolic" else rows, k, n, arrays["values"].shape[0])
    out = run_kernel(func, [x, arrays["values"], arrays["index"], arrays["offsets"]], (rows, n))
    expected = x.astype(np.float64) @ (w * keep).T.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_p16_refuses_an_uneven_mask():
    keep = np.zeros((16, 16), bool)
    keep[:, :4] = True
    keep[0, 5] = True
    with pytest.raises(ValueError, match="same count"):
        sparse.pack_p16(np.ones((16, 16), np.float32), keep)


def test_rewrites_a_linear_layer_to_the_bsr_kernel():
    n, k, block = 32, 16, (16, 4)
    x = relax.Var("x", relax.TensorType((2, 3, k), "float32"))
    w = relax.Var("w", relax.TensorType((n, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], {"num_input": 1}):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(w))
            y = bb.emit_output(relax.op.matmul(x, t))
        bb.emit_func_output(y)
    before = bb.get()
    weight = np.zeros((n, k), np.float32)
    weight[:16, 4:8] = GEN.standard_normal((16, 4))   # one block kept in each block row
    weight[16:, 12:] = GEN.standard_normal((16, 4))
    signature = FunctionSignature([TensorSpec("x", [2, 3, k], "float32")],
                                  [TensorSpec("y", [2, 3, n], "float32")], ["w"])
    # the rewrite for an AVX-512 CPU, whatever this host is (nothing here runs the kernel)
    avx512 = resolve_target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    state = CompileState(before, {"w": weight}, {"main": signature}, target=avx512)
    did = P.Sparsify("bsr", block="16x4", ratio=0.75, importance="magnitude").run(state)

    bb = relax.BlockBuilder()
    kernel = bb.add_func(sparse.bsr_matmul_func(6, k, n, block, 2, 2), "bsr_matmul")
    x = relax.Var("x", relax.TensorType((2, 3, k), "float32"))
    params = [relax.Var(f"w.{role}", relax.TensorType(shape, dtype)) for role, shape, dtype in
              (("data", (2, 4, 16), "float32"), ("indices", (2,), "int32"),
               ("indptr", (3,), "int32"))]
    with bb.function("main", [x, *params], {"num_input": 1}):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, [6, k]))
            product = bb.emit(relax.call_tir(kernel, [flat, *params],
                                             relax.TensorType([6, n], "float32")))
            y = bb.emit_output(relax.op.reshape(product, [2, 3, n]))
        bb.emit_func_output(y)
    tvm.ir.assert_structural_equal(state.mod, bb.get())
    np.testing.assert_array_equal(state.params["w.indices"], [1, 3])
    np.testing.assert_array_equal(state.params["w.indptr"], [0, 1, 2])
    np.testing.assert_array_equal(state.params["w.data"][0], weight[:16, 4:8].T)
    assert "w" not in state.params and state.signatures["main"].params == [
        "w.data", "w.indices", "w.indptr"]
    assert did["layers"]["w"]["blocks_kept"] == 2 and did["sparsity"] == 0.75


class MLP(torch.nn.Module):
    def __init__(self, d=64, hidden=96, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def pruned_here(w: np.ndarray, pattern: str, block=None, ratio=None, scale=None) -> np.ndarray:
    """The weight pruned by importance |W| (times `scale` per input), written independently
    of graft's masks: blocks by their summed importance over the layer, N:M per row."""
    n, k = w.shape
    score = np.abs(w.astype(np.float64)) * (1 if scale is None else scale[None, :])
    keep = np.zeros((n, k), bool)
    if pattern == "unstructured":  # per row
        for r in range(n):
            keep[r, np.argsort(-score[r], kind="stable")[:round(k * (1 - ratio))]] = True
    elif pattern == "bsr":
        bn, bk = block
        blocks = [(score[r:r + bn, c:c + bk].sum(), r, c)
                  for r in range(0, n, bn) for c in range(0, k, bk)]
        for _, r, c in sorted(blocks, key=lambda b: -b[0])[:round(len(blocks) * (1 - ratio))]:
            keep[r:r + bn, c:c + bk] = True
    else:
        kept, group = map(int, pattern.split(":"))
        for r in range(n):
            for c in range(0, k, group):
                keep[r, c + np.argsort(-score[r, c:c + group], kind="stable")[:kept]] = True
    return w * keep


@pytest.mark.parametrize("pattern,options", [
    ("bsr", {"block": "16x1", "ratio": 0.75}), ("bsr", {"block": "32x4", "ratio": 0.5}),
    ("2:4", {}), ("1:4", {}), ("4:8", {}), ("unstructured", {"ratio": 0.7})])
def test_pruned_model_matches_torch_with_the_same_weights_removed(tmp_path, pattern, options):
    model = MLP().eval()
    x = torch.randn(3, 5, 64)
    compiled = graft.compile(model, (x,), passes=[
        P.Sparsify(pattern, importance="magnitude", **options)])
    compiled.save(tmp_path / "art")
    got = graft.load(tmp_path / "art")(x.numpy())
    reference = copy.deepcopy(model)
    block = L.parse_block(options["block"]) if "block" in options else None
    with torch.no_grad():
        for layer in (reference.up, reference.down):
            layer.weight.copy_(torch.from_numpy(pruned_here(
                layer.weight.numpy(), pattern, block, options.get("ratio"))))
        expected, full = reference(x).numpy(), model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - full).max() > 1e-2  # really pruned
    did = compiled.manifest["passes"][0]["did"]
    if not HAS_SPARSE_KERNELS:  # the same pruned weights, stored and multiplied dense
        assert did["kernel"].startswith("dense fallback: no sparse kernel")
        assert did["weight_bytes"]["after"] == did["weight_bytes"]["before"]
        return
    assert did["kernel"] == {"bsr": "bsr_matmul", "unstructured": "unstructured_matmul"}.get(
        pattern, "p16_matmul")
    assert did["weight_bytes"]["after"] < did["weight_bytes"]["before"]
    assert set(did["layers"]) == {"p_up_weight", "p_down_weight"}


def test_activation_importance_and_correction(tmp_path):
    """Wanda's |W| * ||x|| picks the kept weights (checked against the mask computed here);
    the correction moves a removed input's weight onto a later input that copies it."""
    model = torch.nn.Linear(64, 32, bias=False).eval()
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 16, 64, generator=gen)
    base[..., 1::2] = base[..., 0::2] * 1.5      # odd inputs copy the even ones before them
    with torch.no_grad():                        # and matter more: the even ones go
        model.weight[:, 0::2] *= 0.1
        model.weight[:, 1::2] += torch.sign(model.weight[:, 1::2])
    calibration = [(b.numpy()[None],) for b in base[:48]]
    x = base[48:52]
    outs = {}
    for correct in (False, True):
        compiled = graft.compile(model, (x[:1],), calibration=calibration, passes=[
            P.Sparsify("1:2", correct=correct)])
        compiled.save(tmp_path / f"art{correct}")
        artifact = graft.load(tmp_path / f"art{correct}")
        outs[correct] = np.concatenate([artifact(x[i:i + 1].numpy()) for i in range(4)])
    with torch.no_grad():
        full = model(x).numpy().reshape(outs[True].shape)
        scale = np.linalg.norm(base[:18].reshape(-1, 64).numpy(), axis=0)  # the fit half
        plain = x.numpy().reshape(-1, 64) @ pruned_here(model.weight.numpy(), "1:2",
                                                         scale=scale).T
    np.testing.assert_allclose(outs[False].reshape(plain.shape), plain, rtol=1e-4, atol=1e-4)
    corrected = np.abs(outs[True] - full).max()
    assert corrected < 0.02 * np.abs(full).max()
    assert np.abs(outs[False] - full).max() > 10 * corrected


def test_block_budget_search_records_its_figures():
    model = MLP(hidden=128).eval()
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64)
    calibration = [(torch.randn(4, 16, 64).numpy(),) for _ in range(8)]
    compiled = graft.compile(model, (x,), calibration=calibration,
                             passes=[P.Sparsify("bsr", block="16x1", budget="cosine>=0.995")])
    did = compiled.manifest["passes"][0]["did"]
    assert did["held_out_value"] >= 0.995 and did["budget"] == "cosine>=0.995"
    assert 0 < did["ratio"] < 0.45
    tried = {float(r): v for r, v in did["tried"].items()}
    assert all((v >= 0.995) == (r <= did["ratio"]) for r, v in tried.items()), tried
    assert did["layers"]["p_up_weight"]["sparsity"] == pytest.approx(did["ratio"], abs=0.01)


def test_dense_fallback_on_a_target_without_the_kernels():
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    w = relax.Var("w", relax.TensorType((16, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], {"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w))))
        bb.emit_func_output(y)
    weight = GEN.standard_normal((16, 32)).astype(np.float32)
    signature = FunctionSignature([TensorSpec("x", [4, 32], "float32")],
                                  [TensorSpec("y", [4, 16], "float32")], ["w"])
    state = CompileState(bb.get(), {"w": weight}, {"main": signature},
                         target=resolve_target("cuda"))
    did = P.Sparsify("2:4").run(state)
    assert did["kernel"].startswith("dense fallback")
    np.testing.assert_array_equal(state.params["w"], pruned_here(weight, "2:4"))


def test_bad_weight_pattern_requests_are_refused():
    with pytest.raises(GraftError, match="multiple of 16"):
        P.Sparsify("bsr", block="4x4", ratio=0.5)
    with pytest.raises(GraftError, match="M dividing 16"):
        P.Sparsify("2:3")
    with pytest.raises(GraftError, match="contradicts"):
        P.Sparsify("2:4", ratio=0.75)
    with pytest.raises(PassError, match="no linear layer it can prune"):
        graft.compile(torch.nn.Linear(20, 24).eval(), (torch.randn(2, 20),),
                      passes=[P.Sparsify("2:4")])


class FFNBlock(torch.nn.Module):
    def __init__(self, d=64, hidden=256):
        super().__init__()
        torch.manual_seed(5)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)
        self.head = torch.nn.Linear(d, 32)

    def forward(self, x):
        return self.head(x + self.down(torch.nn.functional.gelu(self.up(x))))


def test_sparsify_then_quantize_in_one_compile(tmp_path):
    """FFN channels pruned, then every linear layer W8A8: the result follows the pruned
    model (reference pruned here by magnitude) within int8's error; the pruned block's
    weights are quantized in their shrunk shapes."""
    model = FFNBlock().eval()
    calibration = [(torch.randn(8, 16, 64).numpy(),) for _ in range(8)]
    x = torch.randn(8, 16, 64)
    compiled = graft.compile(model, (x,), calibration=calibration, passes=[
        P.Sparsify("ffn_channels", ratio=0.5, importance="magnitude", correct=False),
        P.Quantize("w8a8")])
    compiled.save(tmp_path / "art")
    got = graft.load(tmp_path / "art")(x.numpy())
    with torch.no_grad():
        importance = np.linalg.norm(model.up.weight.numpy(), axis=1) * \
            np.linalg.norm(model.down.weight.numpy(), axis=0)
        kept = np.sort(np.argsort(-importance)[:128])
        hidden = torch.nn.functional.gelu(x @ model.up.weight[kept].T + model.up.bias[kept])
        pruned = model.head(x + hidden @ model.down.weight[:, kept].T + model.down.bias).numpy()
    cosine = (got * pruned).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(pruned,
                                                                                     axis=-1)
    assert cosine.min() > 0.995
    passes = {p["pass"]: p["did"] for p in compiled.manifest["passes"]}
    assert passes["sparsify"]["sparsity"] == 0.5
    assert {name: figures["precision"] for name, figures in passes["quantize"]["layers"].items()
            } == {"p_up_weight": "w8a8", "p_down_weight": "w8a8", "p_head_weight": "w8a8"}
    assert compiled.params["p_down_weight.wq"].size == 64 * 128


def test_sparsify_after_quantize_is_refused():
    with pytest.raises(GraftError, match="Sparsify must come before Quantize"):
        graft.compile(MLP().eval(), (torch.randn(2, 64),),
                      passes=[P.Quantize("int8"), P.Sparsify("2:4")])


def test_sparsegpt_selection_keeps_n_of_m_and_beats_a_fixed_mask():
    """SparseGPT's N:M choice during the correction (importance "hessian"): every row keeps 2
    of each 4 inputs, and the layer's output on the activations moves less than with Wanda's
    mask corrected the same way, which moves less than Wanda's mask alone."""
    gen = np.random.default_rng(0)
    x = (gen.standard_normal((4000, 128)) @ gen.standard_normal((128, 128)) * 0.3
         + gen.standard_normal((4000, 128))) * np.exp(gen.standard_normal(128))
    w = gen.standard_normal((64, 128))
    gram = x.T @ x / len(x)

    def error(pruned):
        return np.linalg.norm(x @ (w - pruned).T) / np.linalg.norm(x @ w.T)

    wanda = L.nm_mask(np.abs(w) * np.sqrt(np.diag(gram))[None], 2, 4)
    corrected, kept = L.correct(w, gram, wanda)
    np.testing.assert_array_equal(kept, wanda)
    chosen, mask = L.correct(w, gram, None, choose_nm=(2, 4))
    assert (mask.reshape(64, 32, 4).sum(axis=2) == 2).all()
    assert not chosen[~mask].any()
    assert error(chosen) < error(corrected) < error(w * wanda)


def test_sparsity_per_layer_in_passes_json_and_report(tmp_path):
    import json

    graft.compile(MLP().eval(), (torch.randn(2, 64),), dump_dir=tmp_path / "dumps",
                  passes=[P.Sparsify("bsr", block="32x1", ratio=0.75, importance="magnitude")])
    records = json.loads((tmp_path / "dumps" / "passes.json").read_text())
    sparsify = next(r for r in records if r["pass"] == "sparsify")
    assert {n: v["sparsity"] for n, v in sparsify["did"]["layers"].items()} == {
        "p_up_weight": 0.75, "p_down_weight": 0.75}
    if HAS_SPARSE_KERNELS:  # elsewhere the pruned weights are stored dense
        assert sparsify["param_bytes"] < records[0]["param_bytes"] * 0.4
    report = (tmp_path / "dumps" / "report.html").read_text()
    assert "sparsity by layer" in report and "p_down_weight" in report
