"""Quantize: packed formats against a reference quantizer written here, the Relax rewrite in
Before/After form, compiled quantized models against PyTorch run with the same rounded weights,
and the accuracy budget with mixed precision."""

import numpy as np
import pytest
import torch
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import graft
import graft.codegen.target
import graft.passes.quantize.int8_kernels
from graft import passes as P
from graft.frontend.imported import FunctionSignature
from graft.passes.pipeline import CompileState
from graft.passes.quantize import formats
from graft.runtime.errors import GraftError


def reference_quantize(w, scheme, group=32, symmetric=False):
    """Element by element, the float weight each format stands for, and the largest error
    rounding may make per element (half a step; int4 may clip, see `minmax_int4_error`).
    int4 takes each group's scale and offset from the packed weight (chosen by a search there)
    and rounds to the nearest of its 16 levels here."""
    n, k = w.shape
    out, bound = np.empty_like(w), np.empty_like(w)
    if scheme == "fp16":  # round to nearest with 10 mantissa bits
        exponent = np.floor(np.log2(np.abs(w)))
        step = 2.0 ** (exponent - 10)
        return np.round(w / step) * step, step / 2
    if scheme == "int8":
        for row in range(n):
            step = np.abs(w[row]).max() / 127
            out[row] = np.round(w[row] / step) * step
            bound[row] = step / 2
        return out, bound
    scales, offsets = stored_group_parameters(formats.quantize(w, "int4", group, symmetric))
    for row in range(n):
        for start in range(0, k, group):
            g = w[row, start:start + group]
            step, low = scales[row, start // group], offsets[row, start // group]
            if symmetric:
                out[row, start:start + group] = np.clip(np.round(g / step), -8, 7) * step
            else:
                out[row, start:start + group] = np.clip(np.round((g - low) / step), 0, 15) \
                    * step + low
            bound[row, start:start + group] = step / 2
    return out, bound


def stored_group_parameters(packed):
    """Each group's scale and offset [N, K/G] as float32, read from the documented layout
    (float16 [N/64, K/G, 64]); offsets are zero when symmetric."""
    def per_row(a):
        return a.astype(np.float32).transpose(0, 2, 1).reshape(packed.n, -1)
    scale = per_row(packed.arrays["scale"])
    return scale, per_row(packed.arrays["offset"]) if "offset" in packed.arrays else 0 * scale


def int4_error_weights(w, group, importance=None):
    """The weight of each element's squared error that int4's fit minimises (formats'
    docstring): its input channel's importance, relative to the mean, times (the group's RMS
    plus |w|)."""
    n, k = w.shape
    channels = np.ones(k) if importance is None else importance / importance.mean()
    g = w.astype(np.float64).reshape(n, k // group, group)
    rms = np.sqrt(np.square(g).mean(axis=2, keepdims=True))
    return (channels.reshape(1, k // group, group) * (rms + np.abs(g))).reshape(n, k)


def minmax_int4_error(w, group, symmetric, weights):
    """Weighted squared error per group [N, K/G] of plain int4 rounding: the group's range (or
    largest magnitude) split into 15 (or 7) equal steps, nothing clipped."""
    n, k = w.shape
    errors = np.empty((n, k // group))
    for row in range(n):
        for start in range(0, k, group):
            g = w[row, start:start + group].astype(np.float64)
            if symmetric:
                step = np.abs(g).max() / 7
                rounded = np.clip(np.round(g / step), -8, 7) * step
            else:
                step = (g.max() - g.min()) / 15
                rounded = np.round((g - g.min()) / step) * step + g.min()
            errors[row, start // group] = (weights[row, start:start + group] *
                                           np.square(rounded - g)).sum()
    return errors


FORMATS = [("int8", 32, False), ("int4", 32, False), ("int4", 64, True), ("int4", 128, False),
           ("fp16", 0, False)]


@pytest.mark.parametrize("scheme,group,symmetric", FORMATS)
def test_packed_format_stands_for_the_reference_rounding(scheme, group, symmetric):
    w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32)
    packed = formats.quantize(w, scheme, group, symmetric)
    expected, bound = reference_quantize(w, scheme, group, symmetric)
    got = formats.dequantize(packed)
    assert np.allclose(got, expected, atol=1e-5)
    if scheme == "int4":  # each group's levels fit it at least as well as its plain range does
        weights = int4_error_weights(w, group)
        errors = (weights * np.square(got - w)).reshape(w.shape[0], -1, group).sum(2)
        plain = minmax_int4_error(w, group, symmetric, weights)
        assert np.all(errors <= plain * 1.001 + 1e-9)
        assert errors.sum() < 0.95 * plain.sum()
    else:
        assert np.all(np.abs(got - w) <= bound * 1.0001 + 1e-7)
    bits = {"int8": 8, "int4": 4, "fp16": 16}[scheme]
    assert packed.arrays["q"].nbytes == w.size * bits // 8


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_keeps_important_input_channels_closer(symmetric):
    w = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    busy = np.zeros(128, bool)
    busy[::8] = True
    importance = np.where(busy, 100.0, 1.0)
    plain = formats.dequantize(formats.quantize(w, "int4", 32, symmetric))
    weighted = formats.dequantize(formats.quantize(w, "int4", 32, symmetric, importance))
    def error(rounded, channels):
        return np.square(rounded - w)[:, channels].mean()
    assert error(weighted, busy) < 0.8 * error(plain, busy)
    weights = int4_error_weights(w, 32, importance)
    assert (weights * np.square(weighted - w)).sum() < (weights * np.square(plain - w)).sum()


@pytest.mark.parametrize("scheme,group,symmetric", FORMATS)
def test_expansion_kernels_compute_the_numpy_dequantization(scheme, group, symmetric):
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    packed = formats.quantize(w, scheme, group, symmetric)
    arrays = [tvm.runtime.tensor(packed.arrays[r]) for r in packed.roles()]
    lib = tvm.compile(tvm.IRModule({"f": formats.dequantize_func(packed).with_attr(
        "global_symbol", "f")}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((128, 64), np.float32))
    lib["f"](*arrays, out)
    np.testing.assert_array_equal(out.numpy(), formats.dequantize(packed).T)

    ids = np.array([5, 0, 63, 64, 1000, -3], np.int64)  # the last three past the table: clipped
    lib = tvm.compile(tvm.IRModule({"g": formats.gather_func(packed, "int64").with_attr(
        "global_symbol", "g")}), target="llvm")
    rows = tvm.runtime.tensor(np.zeros((len(ids), 128), np.float32))
    lib["g"](*arrays, tvm.runtime.tensor(ids), rows)
    np.testing.assert_array_equal(rows.numpy(), formats.dequantize(packed)[np.clip(ids, 0, 63)])


def test_linear_weight_is_read_through_its_dequantize_kernel():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 32), "float32"), w: R.Tensor((16, 32), "float32")):
            with R.dataflow():
                wt = R.permute_dims(w, axes=[1, 0])
                y = R.matmul(x, wt)
                R.output(y)
            return y

    weight = np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)
    packed = formats.quantize(weight, "int8")

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 32), "float32"), w_q: R.Tensor((32, 16), "int8"),
                 w_scale: R.Tensor((16,), "float32")):
            cls = Expected
            with R.dataflow():
                wt = R.call_tir(cls.dequantize_int8, (w_q, w_scale),
                                out_ty=R.Tensor((32, 16), "float32"))
                y = R.matmul(x, wt)
                R.output(y)
            return y

        @T.prim_func(private=True)
        def dequantize_int8(q: T.Buffer((32, 16), "int8"), s: T.Buffer((16,), "float32"),
                            w: T.Buffer((32, 16), "float32")):
            T.evaluate(0)  # stands in for the kernel formats.dequantize_func makes, set below

    expected = Expected.clone()
    expected[expected.get_global_var("dequantize_int8")] = formats.dequantize_func(packed)
    state = CompileState(Before, {"w": weight}, {"main": FunctionSignature([], [], ["w"])})
    did = P.Quantize("int8").run(state)
    assert state.signatures["main"].params == ["w.q", "w.scale"]
    assert did["precisions"] == {"int8": 1}
    after = state.mod
    assert_equal_ignoring_param_names(after, expected)
    np.testing.assert_array_equal(state.params["w.q"], packed.arrays["q"])
    assert "w" not in state.params


def assert_equal_ignoring_param_names(after, expected):
    """Structural equality; Var names are not compared by assert_structural_equal, but
    the parameter names the pass chose are checked here."""
    tvm.ir.assert_structural_equal(after, expected)
    names = [p.name for p in after["main"].params]
    assert names == ["x", "w.q", "w.scale"]


class MLP(torch.nn.Module):
    def __init__(self, sizes=(64, 128, 64), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b)
                                          for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


def rounded_copy(model, scheme, group=32, symmetric=False):
    """The model with every Linear weight replaced by the reference rounding."""
    copy = MLP([layer.in_features for layer in model.layers] + [model.layers[-1].out_features])
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in copy.layers:
            rounded, _ = reference_quantize(layer.weight.numpy(), scheme, group, symmetric)
            layer.weight.copy_(torch.from_numpy(rounded))
    return copy.eval()


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("scheme,group,symmetric", [("int8", 32, False), ("int4", 32, False),
                                                    ("int4", 32, True), ("fp16", 32, False)])
def test_quantized_model_matches_torch_with_the_same_rounding(tmp_path, rows, scheme, group,
                                                              symmetric):
    model = MLP().eval()
    x = torch.randn(rows, 64)
    compiled = graft.compile(model, (x,), passes=[P.Quantize(scheme, group_size=group,
                                                             symmetric=symmetric)])
    compiled.save(tmp_path / "art")
    got = graft.load(tmp_path / "art")(x.numpy())
    with torch.no_grad():
        expected = rounded_copy(model, scheme, group, symmetric)(x).numpy()
        full = model(x).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - full).max() > (1e-6 if scheme == "fp16" else 1e-3)  # really rounded
    kernels = compiled.manifest["kernels"]
    assert not kernels["generic_kernels"]
    if rows == 1:  # the product reads the packed weight itself
        assert kernels["rules"] == {"QuantizedGEMV" if scheme == "int4" else "GEMV": 2}
    bits = {"int8": 8, "int4": 4, "fp16": 16}[scheme]
    packed = sum(a.nbytes for n, a in compiled.params.items() if n.endswith(".q"))
    assert packed == (64 * 128 + 128 * 64) * bits // 8


class TiedLM(torch.nn.Module):
    """An embedding table that is also the output layer's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(128, 64)
        self.mix = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 128, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_embedding_is_read_from_the_packed_output_weight(tmp_path):
    model = TiedLM().eval()
    ids = torch.tensor([[3, 127, 0, 64]])
    compiled = graft.compile(model, (ids,), passes=[P.Quantize("int4")])
    assert not any(not n.endswith((".q", ".scale", ".offset", "bias")) for n in compiled.params)
    compiled.save(tmp_path / "art")
    got = graft.load(tmp_path / "art")(ids.numpy())
    with torch.no_grad():
        for module in (model.embed, model.mix):
            rounded, _ = reference_quantize(module.weight.numpy(), "int4")
            module.weight.copy_(torch.from_numpy(rounded))
        expected = model(ids).numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_budget_keeps_the_most_sensitive_layers_at_int8(tmp_path):
    model = MLP((64, 128, 128, 128, 64), seed=4).eval()
    with torch.no_grad():  # one layer with outliers: int4 hurts it most
        model.layers[1].weight[:, ::16] *= 12
    gen = torch.Generator().manual_seed(5)
    calibration = [(torch.randn(4, 64, generator=gen),) for _ in range(8)]
    all_int4 = graft.compile(model, calibration[0], passes=[P.Quantize("int4", metric="cosine")],
                             calibration=calibration)
    reached = all_int4.manifest["passes"][0]["did"]["calibration_value"]
    assert reached < 0.99995
    budget = 1 - (1 - reached) / 4
    compiled = graft.compile(model, calibration[0], calibration=calibration,
                             passes=[P.Quantize("int4", budget=f"cosine>={budget:.6f}")])
    did = compiled.manifest["passes"][0]["did"]
    assert did["calibration_value"] >= budget
    precisions = {name: layer["precision"] for name, layer in did["layers"].items()}
    assert set(precisions.values()) == {"int4", "int8"}
    assert precisions["p_layers_1_weight"] == "int8"
    assert all("sensitivity" in layer for layer in did["layers"].values())
    compiled.save(tmp_path / "art")
    got = graft.load(tmp_path / "art")(calibration[0][0].numpy())
    with torch.no_grad():
        full = model(calibration[0][0]).numpy()
    cosine = (got * full).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(full, axis=-1)
    assert cosine.mean() > 1 - 4 * (1 - reached)

    with pytest.raises(GraftError, match="cannot meet the budget cosine>=1"):
        graft.compile(model, calibration[0], calibration=calibration,
                      passes=[P.Quantize("int4", budget="cosine>=1.0")])


def test_bad_options_are_refused():
    with pytest.raises(GraftError, match="scheme 'int3'"):
        P.Quantize("int3")
    with pytest.raises(GraftError, match="group size 48"):
        P.Quantize("int4", group_size=48)
    with pytest.raises(GraftError, match="not understood"):
        P.Quantize("int4", budget="accuracy>0.9")
    with pytest.raises(GraftError, match="bounded from above"):
        P.Quantize("int4", budget="perplexity>=1.05")
    with pytest.raises(GraftError, match="between 0 and 1"):
        P.Quantize("int4", budget="top1>=1.2")
    with pytest.raises(GraftError, match="needs calibration data"):
        graft.compile(MLP().eval(), (torch.randn(1, 64),),
                      passes=[P.Quantize("int4", budget="cosine>=0.99")])


def unpack_vnni(packed: np.ndarray) -> np.ndarray:
    """[N/16, K/4, 64] -> int8 [N, K], written independently of int8_kernels.pack_vnni."""
    n16, k4, _ = packed.shape
    out = np.empty((n16 * 16, k4 * 4), np.int8)
    for block in range(n16):
        for step in range(k4):
            for lane in range(16):
                out[block * 16 + lane, step * 4:step * 4 + 4] = packed[block, step,
                                                                      lane * 4:lane * 4 + 4]
    return out


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_w8a8_matches_integer_arithmetic_in_numpy_and_the_float_model(tmp_path, activations):
    model = MLP((64, 128, 128, 64), seed=6).eval()
    gen = torch.Generator().manual_seed(7)
    calibration = [(torch.randn(8, 64, generator=gen),) for _ in range(8)]
    compiled = graft.compile(model, calibration[0], calibration=calibration,
                             passes=[P.Quantize("w8a8", activations=activations)])
    did = compiled.manifest["passes"][0]["did"]
    assert did["precisions"] == {"w8a8": 3} and did["held_out_value"] > 0.99
    if P.quantize.int8_kernels.has_vnni(graft.codegen.target.resolve_target("cpu")):
        assert compiled.manifest["kernels"]["rules"]["Int8MatmulVNNI"] == 3
    compiled.save(tmp_path / "art")
    x = torch.randn(8, 64, generator=gen)
    got = graft.load(tmp_path / "art")(x.numpy())

    params = compiled.params
    h = x.numpy().astype(np.float32)
    for i, layer in enumerate(model.layers):
        name = f"p_layers_{i}_weight"
        scaled = h * params[f"{name}.act"]
        step = np.abs(scaled).max(axis=1, keepdims=True) / 127 if activations == "dynamic" \
            else np.float32(1)
        xq = np.clip(np.rint(scaled / step) + 128, 0, 255).astype(np.int64)
        acc = xq @ unpack_vnni(params[f"{name}.wq"]).astype(np.int64).T
        if activations == "dynamic":
            h = (acc + params[f"{name}.reoffset"]) * step * params[f"{name}.rescale"]
        else:
            h = acc * params[f"{name}.rescale"] + params[f"{name}.reoffset"]
        h = h.astype(np.float32)
        h = h + layer.bias.detach().numpy()
        if i < len(model.layers) - 1:
            h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
    assert np.abs(got - h).max() < 0.02 * np.abs(h).max()
    with torch.no_grad():
        full = model(x).numpy()
    cosine = (got * full).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(full, axis=-1)
    assert cosine.mean() > 0.99


def test_w8a8_needs_calibration():
    with pytest.raises(GraftError, match="w8a8 needs calibration data"):
        graft.compile(MLP().eval(), (torch.randn(8, 64),), passes=[P.Quantize("w8a8")])


def test_quantize_figures_in_passes_json_and_report(tmp_path):
    import json

    gen = torch.Generator().manual_seed(8)
    calibration = [(torch.randn(4, 64, generator=gen),) for _ in range(4)]
    graft.compile(MLP().eval(), calibration[0], passes=[P.Quantize("int4")],
                  calibration=calibration, dump_dir=tmp_path / "dumps")
    records = json.loads((tmp_path / "dumps" / "passes.json").read_text())
    quantize = next(r for r in records if r["pass"] == "quantize")
    assert quantize["did"]["metric"] == "cosine" and 0.9 < quantize["did"]["held_out_value"] <= 1
    layers = quantize["did"]["layers"]
    assert set(layers) == {"p_layers_0_weight", "p_layers_1_weight"}
    assert all(0 < layer["weight_error"] < 0.2 and layer["precision"] == "int4"
               for layer in layers.values())
    assert quantize["param_bytes"] < records[0]["param_bytes"] / 4
    report = (tmp_path / "dumps" / "report.html").read_text()
    assert "weight error by layer" in report and "p_layers_1_weight" in report


def test_int4_with_calibration_weighs_rounding_by_the_inputs(tmp_path):
    """A few input channels carry large activations in the calibration data: the compiled int4
    model rounds the weights those channels meet more closely than one compiled without
    calibration, and so its outputs are closer to the float model's."""
    model = MLP((64, 64), seed=9).eval()
    gen = torch.Generator().manual_seed(10)
    loud = torch.ones(64)
    loud[::8] = 30.0
    calibration = [(torch.randn(16, 64, generator=gen) * loud,) for _ in range(4)]
    plain = graft.compile(model, calibration[0], passes=[P.Quantize("int4")])
    aware = graft.compile(model, calibration[0], passes=[P.Quantize("int4")],
                          calibration=calibration)
    w = model.layers[0].weight.detach().numpy()

    def channel_error(compiled):
        packed = {r: compiled.params[f"p_layers_0_weight.{r}"] for r in ("q", "scale", "offset")}
        layout = formats.PackedWeight("int4", 64, 64, 32, False, packed)
        return np.square(formats.dequantize(layout) - w)[:, ::8].mean()

    assert channel_error(aware) < 0.8 * channel_error(plain)
    x = torch.randn(16, 64, generator=gen) * loud
    with torch.no_grad():
        expected = model(x).numpy()
    errors = []
    for name, compiled in (("plain", plain), ("aware", aware)):
        compiled.save(tmp_path / name)
        errors.append(np.square(graft.load(tmp_path / name)(x.numpy()) - expected).mean())
    assert errors[1] < 0.9 * errors[0]


def test_weight_beyond_float16_range_falls_back_from_int4():
    model = MLP(seed=11).eval()
    with torch.no_grad():
        model.layers[1].weight[0, 0] = 1e5  # its int4 offset would overflow float16
    compiled = graft.compile(model, (torch.randn(2, 64),), passes=[P.Quantize("int4")])
    layers = compiled.manifest["passes"][0]["did"]["layers"]
    assert layers["p_layers_0_weight"]["precision"] == "int4"
    assert layers["p_layers_1_weight"]["precision"] == "int8"
    assert "float16" in layers["p_layers_1_weight"]["not_int4"]
