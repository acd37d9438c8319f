"""ONNX path: models from torch.onnx.export and hand-built graphs, compared with ONNX Runtime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graft
from graft.frontend.onnx_frontend import save_for_onnxruntime
from graft.runtime.errors import ModelLoadError

from conftest import max_abs


def ort_run(model, feeds, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "for_ort.onnx"
    save_for_onnxruntime(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def compile_and_load(model, tmp_path, specs=None):
    compiled = graft.compile(model, input_specs=specs)
    compiled.save(tmp_path / "art")
    return graft.load(tmp_path / "art")


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_torch_onnx_export_with_dynamic_batch(tiny_model, tmp_path):
    import torch

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_model, (torch.randn(2, 8),), str(path), input_names=["x"],
                      output_names=["probs"], dynamic_axes={"x": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    runtime = compile_and_load(path, tmp_path)
    assert [str(s) for s in runtime.inputs] == ["x:batchx8:float32"]
    model = onnx.load(str(path))
    for batch in (1, 4, 9):
        x = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float32)
        (expected,) = ort_run(model, {"x": x}, tmp_path)
        assert max_abs(runtime(x), expected) < 1e-5


def test_input_spec_overrides_graph_shape(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    runtime = compile_and_load(model, tmp_path, ["x:rowsx3:float32"])
    x = np.array([[-1, 0, 2]] * 5, np.float32)
    assert np.array_equal(runtime(x), np.maximum(x, 0))


def test_constant_of_shape_with_empty_shape(tmp_path):
    """ConstantOfShape given an empty shape makes a rank-0 tensor; TVM's importer broadcasts it
    to R.shape([]) and fails. graft folds it before import."""
    shape = numpy_helper.from_array(np.array([], np.int64), "empty_shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["empty_shape"], ["scalar"],
                         value=numpy_helper.from_array(np.array([2.5], np.float32))),
        helper.make_node("Mul", ["x", "scalar"], ["y"]),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [shape])
    runtime = compile_and_load(model, tmp_path)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (expected,) = ort_run(model, {"x": x}, tmp_path)
    assert np.array_equal(runtime(x), expected)


def test_shape_concat_reshape_keeps_symbolic_dims(tmp_path):
    """The dynamo exporter writes reshapes whose target comes from Shape→Slice→Concat; the
    imported reshape must keep `batch`/`seq` symbolic, not lose the output shape."""
    one = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["batch_seq"]),
        helper.make_node("Concat", ["batch_seq", "heads", "head_dim"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["split"]),
        helper.make_node("Transpose", ["split"], ["y"], perm=[0, 2, 1, 3]),
    ]
    inits = [one("zero", [0]), one("two", [2]), one("heads", [2]), one("head_dim", [3])]
    model = make_model(nodes,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "seq", 3])],
                       inits)
    runtime = compile_and_load(model, tmp_path)
    assert runtime.outputs[0].shape == ["batch", 2, "seq", 3]
    for shape in ((1, 4, 6), (3, 7, 6)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        (expected,) = ort_run(model, {"x": x}, tmp_path)
        assert np.array_equal(runtime(x), expected)


def test_corrupt_and_missing_onnx(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        graft.compile(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        graft.compile(tmp_path / "junk.onnx")


def test_onnx_converter_for_missing_op(tmp_path):
    from tvm import relax

    node = helper.make_node("Swish3", ["x"], ["y"], domain="com.example", name="swish_node")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))

    def swish3(bb, inputs, attrs):  # x * sigmoid(3x)
        x = inputs[0]
        return relax.op.multiply(x, relax.op.sigmoid(relax.op.multiply(x, relax.const(3.0))))

    compiled = graft.compile(model, converters={"com.example.Swish3": swish3})
    compiled.save(tmp_path / "art")
    x = np.array([-1, 0, 0.5, 2], np.float32)
    assert max_abs(graft.load(tmp_path / "art")(x), x / (1 + np.exp(-3 * x))) < 1e-6


def test_rank0_input_and_initializer(tmp_path):
    """Scalars stay scalars through the artifact (np.ascontiguousarray would make them 1-d)."""
    scale = numpy_helper.from_array(np.array(3.0, np.float32), "scale")
    nodes = [helper.make_node("Mul", ["x", "scale"], ["t"]), helper.make_node("Add", ["t", "s"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [scale])
    runtime = compile_and_load(model, tmp_path)
    assert runtime.inputs[1].shape == []
    out = runtime(np.array([1, 2], np.float32), np.array(0.5, np.float32))
    assert out.tolist() == [3.5, 6.5]


def test_a_zero_where_the_model_divides_is_refused_before_the_kernels(tmp_path):
    """Slice steps and an integer divisor given at run time: a zero would end the process in
    the compiled code (SIGFPE); the runtime refuses it by name. Other values match ORT."""
    i64 = TensorProto.INT64
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]),
             helper.make_node("Div", ["n", "d"], ["q"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 8])] + [
        helper.make_tensor_value_info(name, i64, [1]) for name in ("starts", "ends", "axes",
                                                                   "steps")] + [
        helper.make_tensor_value_info(name, i64, [3]) for name in ("n", "d")]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 3]),
                                       helper.make_tensor_value_info("q", i64, [3])])
    runtime = compile_and_load(model, tmp_path)
    feeds = {"x": np.arange(48, dtype=np.float32).reshape(6, 8), "starts": np.array([1]),
             "ends": np.array([7]), "axes": np.array([1]), "steps": np.array([2]),
             "n": np.array([7, -9, 4]), "d": np.array([2, 4, 3])}
    got = runtime.run(feeds)
    for name, want in zip(("y", "q"), ort_run(model, feeds, tmp_path)):
        np.testing.assert_array_equal(got[name], want)
    with pytest.raises(graft.GraftError, match="input 'steps' holds a zero.*Slice"):
        runtime.run({**feeds, "steps": np.array([0])})
    with pytest.raises(graft.GraftError, match="input 'd' holds a zero.*Div"):
        runtime.run({**feeds, "d": np.array([2, 0, 3])})


@pytest.mark.parametrize("op,keepdims", [("ReduceMean", 1), ("ReduceMax", 0),
                                         ("ReduceLogSumExp", 1), ("ReduceL2", 0)])
def test_reduce_with_axes_given_at_run_time(op, keepdims, tmp_path):
    """One artifact, axes chosen per call: the output's shape follows them."""
    nodes = [helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)]
    out_rank = 3 if keepdims else 2
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
                               helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)],
                       opset=18)
    runtime = compile_and_load(model, tmp_path)
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    for axis in (0, -1, 1):
        axes = np.array([axis], np.int64)
        (expected,) = ort_run(model, {"x": x, "axes": axes}, tmp_path)
        got = runtime(x, axes)
        assert got.shape == expected.shape
        assert max_abs(got, expected) < 1e-5


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_from_torch_onnx_export(kind, tmp_path):
    """torch.nn.LSTM/GRU/RNN (two layers, bidirectional, batch first) export as ONNX's
    recurrent ops; the artifact runs any batch size and matches PyTorch."""
    import torch

    torch.manual_seed(0)
    layer = getattr(torch.nn, kind)(input_size=6, hidden_size=5, num_layers=2,
                                    bidirectional=True, batch_first=True).eval()

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            out, state = self.layer(x)
            return out, state[0] if kind == "LSTM" else state

    model = Outputs().eval()
    path = tmp_path / "recurrent.onnx"
    torch.onnx.export(model, (torch.randn(2, 7, 6),), str(path), input_names=["x"],
                      output_names=["y", "h"], dynamic_axes={"x": {0: "batch"}},
                      opset_version=17, dynamo=False)
    assert kind in {n.op_type for n in onnx.load(str(path)).graph.node}
    runtime = compile_and_load(path, tmp_path)
    for batch in (1, 4):
        x = torch.randn(batch, 7, 6)
        with torch.no_grad():
            expected = [t.numpy() for t in model(x)]
        got = runtime(x.numpy())
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            assert max_abs(g, e) < 1e-5


def test_shape_output_is_an_int64_tensor_in_the_artifact(tmp_path):
    """Shape(x) as a graph output imports as a Relax shape value; the artifact returns it as
    the int64 tensor ONNX specifies (its manifest could not describe a shape value)."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                       [helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
                        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    runtime = compile_and_load(model, tmp_path)
    x = np.ones((5, 3), np.float32)
    shape, y = runtime(x)
    (expected_shape, _) = ort_run(model, {"x": x}, tmp_path)
    assert shape.dtype == np.int64 and np.array_equal(shape, expected_shape)
    assert np.array_equal(y, x)


@pytest.mark.parametrize("inverse,onesided", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_dft_matches_numpy(inverse, onesided, tmp_path):
    """DFT along axis 1 of a batch of complex (or, one-sided forward, real) signals."""
    rng = np.random.default_rng(4)
    channels = 1 if onesided and not inverse else 2
    length = 9 if inverse and onesided else 16
    node = helper.make_node("DFT", ["x"], ["y"], axis=1, inverse=inverse, onesided=onesided)
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["n", length, 3, channels])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=19)
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    runtime = compile_and_load(model, tmp_path)
    x = rng.standard_normal((2, length, 3, channels)).astype(np.float32)
    signal = x[..., 0] + 1j * x[..., 1] if channels == 2 else x[..., 0]
    if inverse and onesided:
        expected = np.fft.irfft(signal, axis=1)[..., None]
    elif inverse:
        spectrum = np.fft.ifft(signal, axis=1)
        expected = np.stack([spectrum.real, spectrum.imag], -1)
    else:
        spectrum = np.fft.rfft(signal, axis=1) if onesided else np.fft.fft(signal, axis=1)
        expected = np.stack([spectrum.real, spectrum.imag], -1)
    got = runtime(x)
    assert got.shape == expected.shape
    assert max_abs(got, expected) < 1e-5


def test_split_with_sizes_given_at_run_time(tmp_path):
    node = helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abc"]
    for o in outputs:
        o.type.tensor_type.shape.Clear()
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9]),
                                helper.make_tensor_value_info("sizes", TensorProto.INT64, [3])],
                       outputs, opset=18)
    runtime = compile_and_load(model, tmp_path)
    x = np.arange(18, dtype=np.float32).reshape(2, 9)
    for sizes in ([2, 3, 4], [0, 9, 0], [5, 1, 3]):
        sizes = np.array(sizes, np.int64)
        expected = ort_run(model, {"x": x, "sizes": sizes}, tmp_path)
        got = runtime(x, sizes)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape and np.array_equal(g, e)


def _resize_model(opset=19, **attrs):
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 5]),
                               helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                      opset=opset)


@pytest.mark.parametrize("attrs", [
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
    {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    {"mode": "cubic", "antialias": 1},
], ids=["nearest", "linear", "linear_align_corners", "cubic_antialias"])
def test_resize_with_scales_given_at_run_time(attrs, tmp_path):
    """One artifact, scales chosen per call, whole and fractional (where ONNX maps coordinates
    by the scale, not by the ratio of the lengths): the output follows onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    model = _resize_model(**attrs)
    runtime = compile_and_load(model, tmp_path)
    reference = ReferenceEvaluator(model)
    x = np.random.default_rng(5).standard_normal((1, 2, 7, 5)).astype(np.float32)
    for factors in ([1, 1, 2, 3], [1, 1, 0.6, 0.45], [1, 1, 1.7, 1]):
        scales = np.array(factors, np.float32)
        (expected,) = reference.run(None, {"x": x, "scales": scales})
        got = runtime(x, scales)
        assert got.shape == expected.shape
        assert max_abs(got, expected) < 1e-5


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_by_constant_sizes_matches_onnxruntime(mode, tmp_path):
    """The usual export: a 2x upsample whose sizes are an initializer."""
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode)
    sizes = numpy_helper.from_array(np.array([1, 3, 16, 12], np.int64), "sizes")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 12])],
                       [sizes], opset=19)
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 6)).astype(np.float32)
    (expected,) = ort_run(model, {"x": x}, tmp_path)
    got = compile_and_load(model, tmp_path)(x)
    assert got.shape == (1, 3, 16, 12)
    assert max_abs(got, expected) < 1e-5


@pytest.mark.parametrize("periodic", [1, 0])
def test_window_of_run_time_length(periodic, tmp_path):
    node = helper.make_node("HannWindow", ["n"], ["w"], periodic=periodic)
    model = make_model([node], [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("w", TensorProto.FLOAT, [None])], opset=17)
    runtime = compile_and_load(model, tmp_path)
    for length in (8, 13):
        period = length if periodic else length - 1
        expected = np.sin(np.pi * np.arange(length) / period) ** 2
        got = runtime(np.array(length, np.int64))
        assert got.shape == (length,)
        assert max_abs(got, expected) < 1e-6


def test_expand_to_a_shape_given_at_run_time(tmp_path):
    """ONNX broadcasting: a 1 in the shape keeps the data's dim ((3, 1) to [2, 1, 6] is
    (2, 3, 6))."""
    node = helper.make_node("Expand", ["x", "shape"], ["y"])
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1]),
                                helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 3)], opset=13)
    runtime = compile_and_load(model, tmp_path)
    x = np.array([[1.0], [2.0], [3.0]], np.float32)
    for shape in ([2, 1, 6], [1, 3, 1], [4, 3, 2]):
        expected = x * np.ones(shape, np.float32)
        got = runtime(x, np.array(shape, np.int64))
        assert got.shape == expected.shape and np.array_equal(got, expected)


def test_center_crop_pad_and_pad_with_run_time_shapes(tmp_path):
    """CenterCropPad to a shape given per call (crop one axis, pad another) and Pad by pads
    given per call (negative pads crop), in one artifact each, against onnx.reference and
    ONNX Runtime (the reference refuses negative pads)."""
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(7).standard_normal((6, 5)).astype(np.float32)
    crop = make_model([helper.make_node("CenterCropPad", ["x", "shape"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 5]),
                       helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 2)], opset=18)
    pad = make_model([helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode="constant")],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 5]),
                      helper.make_tensor_value_info("pads", TensorProto.INT64, [4]),
                      helper.make_tensor_value_info("value", TensorProto.FLOAT, [])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 2)], opset=18)
    crop_runtime, pad_runtime = (compile_and_load(m, tmp_path / name)
                                 for m, name in ((crop, "crop"), (pad, "pad")))
    for shape in ([3, 8], [6, 5], [1, 2]):
        shape = np.array(shape, np.int64)
        (expected,) = ReferenceEvaluator(crop).run(None, {"x": x, "shape": shape})
        got = crop_runtime(x, shape)
        assert got.shape == expected.shape and np.array_equal(got, expected)
    for pads in ([1, 0, 2, 3], [0, -2, -1, 1]):
        feeds = {"x": x, "pads": np.array(pads, np.int64), "value": np.array(-4.0, np.float32)}
        (expected,) = ort_run(pad, feeds, tmp_path)
        got = pad_runtime(*feeds.values())
        assert got.shape == expected.shape and np.array_equal(got, expected)


def test_non_max_suppression_with_limits_given_at_run_time(tmp_path):
    """max_output_boxes_per_class and the thresholds fed per call (TVM's converter put in its
    defaults for them): the selected boxes follow onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("NonMaxSuppression",
                            ["boxes", "scores", "max_boxes", "iou", "score_min"], ["selected"])
    model = make_model([node], [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [2, 6, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3, 6]),
        helper.make_tensor_value_info("max_boxes", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("score_min", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])], opset=11)
    runtime = compile_and_load(model, tmp_path)
    rng = np.random.default_rng(8)
    corners = rng.uniform(0, 8, (2, 6, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(1, 4, (2, 6, 2))], axis=2)
    boxes = boxes.astype(np.float32)
    scores = rng.uniform(0, 1, (2, 3, 6)).astype(np.float32)
    for limit, iou, score_min in ((1, 0.5, 0.0), (3, 0.3, 0.2), (6, 0.9, 0.0)):
        feeds = {"boxes": boxes, "scores": scores, "max_boxes": np.array([limit]),
                 "iou": np.array([iou], np.float32), "score_min": np.array([score_min], np.float32)}
        (expected,) = ReferenceEvaluator(model).run(None, feeds)
        got = runtime(*feeds.values())
        assert got.shape == expected.shape and np.array_equal(got, expected), (limit, iou)
    # the usual export: the limits are initializers
    limits = [numpy_helper.from_array(v, n) for n, v in
              (("max_boxes", np.array([2])), ("iou", np.array([0.4], np.float32)),
               ("score_min", np.array([0.1], np.float32)))]
    constant = make_model([node], list(model.graph.input)[:2], list(model.graph.output), limits,
                          opset=11)
    feeds = {"boxes": boxes, "scores": scores}
    (expected,) = ReferenceEvaluator(constant).run(None, feeds)
    got = compile_and_load(constant, tmp_path / "constant")(boxes, scores)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_det_matches_numpy(tmp_path):
    """Batches of 5x5 matrices, one singular and one that needs row swaps (a zero corner)."""
    model = make_model([helper.make_node("Det", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], opset=11)
    x = np.random.default_rng(9).standard_normal((4, 5, 5)).astype(np.float32)
    x[1, 4] = x[1, 0] + x[1, 2]  # singular
    x[2, 0, 0] = 0.0
    x[3] = np.eye(5, dtype=np.float32)[[1, 0, 2, 4, 3]]  # a permutation: det +1
    got = compile_and_load(model, tmp_path)(x)
    expected = np.linalg.det(x.astype(np.float64))
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-5), (got, expected)


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices_output_matches_onnxruntime(storage_order, tmp_path):
    node = helper.make_node("MaxPool", ["x"], ["y", "indices"], kernel_shape=[3, 2],
                            strides=[2, 1], pads=[1, 0, 1, 1], storage_order=storage_order)
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
                       opset=12)
    for output in model.graph.output:
        output.type.tensor_type.shape.Clear()
    x = np.random.default_rng(10).standard_normal((2, 3, 7, 6)).astype(np.float32)
    expected = ort_run(model, {"x": x}, tmp_path)
    got = compile_and_load(model, tmp_path)(x)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and np.array_equal(g, e)


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
def test_tfidf_vectorizer_matches_the_reference(mode, tmp_path):
    """Unigrams, bigrams and trigrams with skips, weighted, over a batch of token rows."""
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node(
        "TfIdfVectorizer", ["x"], ["y"], mode=mode, min_gram_length=1, max_gram_length=3,
        max_skip_count=2, ngram_counts=[0, 3, 7], ngram_indexes=[6, 0, 1, 2, 3, 4, 5],
        pool_int64s=[2, 3, 5, 2, 3, 3, 5, 5, 2, 2, 2, 3, 5],
        weights=[1.0, 2.0, 3.0, 0.5, 5.0, 6.0, 7.0])
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.INT32, [3, 9])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7])], opset=9)
    x = np.random.default_rng(11).integers(1, 6, (3, 9)).astype(np.int32)
    (expected,) = ReferenceEvaluator(model).run(None, {"x": x})
    got = compile_and_load(model, tmp_path)(x)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_scan_is_unrolled_in_both_directions(tmp_path):
    """A running sum over x (forward) and a running product over w (scanned in reverse along
    axis 1), the per-step outputs stacked along axis 1, against numpy (onnx.reference has no
    reverse direction)."""
    f2 = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
         helper.make_node("Mul", ["p_in", "w_t"], ["p_out"]),
         helper.make_node("Sub", ["s_out", "p_out"], ["d"])],
        "body", [helper.make_tensor_value_info(n, f2, [3]) for n in ("s_in", "p_in", "x_t", "w_t")],
        [helper.make_tensor_value_info(n, f2, [3]) for n in ("s_out", "p_out", "d")])
    node = helper.make_node("Scan", ["s0", "p0", "x", "w"], ["s", "p", "ds"], body=body,
                            num_scan_inputs=2, scan_input_axes=[0, 1],
                            scan_input_directions=[0, 1], scan_output_axes=[1])
    model = make_model([node], [helper.make_tensor_value_info("s0", f2, [3]),
                                helper.make_tensor_value_info("p0", f2, [3]),
                                helper.make_tensor_value_info("x", f2, [4, 3]),
                                helper.make_tensor_value_info("w", f2, [3, 4])],
                       [helper.make_tensor_value_info(n, f2, None) for n in ("s", "p", "ds")],
                       opset=16)
    for output in model.graph.output:
        output.type.tensor_type.shape.Clear()
    rng = np.random.default_rng(12)
    feeds = {"s0": rng.standard_normal(3).astype(np.float32),
             "p0": np.ones(3, np.float32),
             "x": rng.standard_normal((4, 3)).astype(np.float32),
             "w": rng.uniform(0.5, 2.0, (3, 4)).astype(np.float32)}
    total, product, steps = feeds["s0"], feeds["p0"], []
    for t in range(4):
        total = total + feeds["x"][t]
        product = product * feeds["w"][:, 3 - t]
        steps.append(total - product)
    expected = [total, product, np.stack(steps, axis=1)]
    got = compile_and_load(model, tmp_path)(*feeds.values())
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and max_abs(g, e) < 1e-5


def test_expand_to_an_initializer_shape(tmp_path):
    """TVM's converter took an initializer shape for a run-time one (an impure call in the
    dataflow block); graft reads it as the constant it is."""
    node = helper.make_node("Expand", ["x", "shape"], ["y"])
    shape = numpy_helper.from_array(np.array([2, 1, 4], np.int64), "shape")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
                       [shape], opset=13)
    x = np.array([[1.0], [2.0], [3.0]], np.float32)
    got = compile_and_load(model, tmp_path)(x)
    assert np.array_equal(got, x * np.ones((2, 1, 4), np.float32))


def test_col2im_with_shapes_given_at_run_time(tmp_path):
    """One artifact, image and block shapes per call, with strides, pads and dilations."""
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=[2, 1],
                            pads=[1, 0, 0, 1], dilations=[1, 2])
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12, 12]),
                                helper.make_tensor_value_info("image", TensorProto.INT64, [2]),
                                helper.make_tensor_value_info("block", TensorProto.INT64, [2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                       opset=18)
    runtime = compile_and_load(model, tmp_path)
    x = np.random.default_rng(13).standard_normal((2, 12, 12)).astype(np.float32)
    for image, block in (([6, 7], [2, 3]), ([7, 5], [3, 2])):
        feeds = {"x": x, "image": np.array(image), "block": np.array(block)}
        (expected,) = ReferenceEvaluator(model).run(None, feeds)
        got = runtime(*feeds.values())
        assert got.shape == expected.shape and max_abs(got, expected) < 1e-5


def test_deform_conv_matches_the_reference(tmp_path):
    """Two groups, two offset groups, stride, dilation, padding, mask and bias; random
    fractional offsets, some moving taps outside the image."""
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("DeformConv", ["x", "w", "offset", "b", "mask"], ["y"],
                            group=2, offset_group=2, strides=[2, 1], dilations=[1, 2],
                            pads=[1, 1, 1, 1], kernel_shape=[3, 2])
    f = TensorProto.FLOAT
    shapes = {"x": [1, 4, 6, 5], "w": [6, 2, 3, 2], "offset": [1, 24, 3, 5], "b": [6],
              "mask": [1, 12, 3, 5]}
    model = make_model([node], [helper.make_tensor_value_info(n, f, s) for n, s in shapes.items()],
                       [helper.make_tensor_value_info("y", f, [1, 6, 3, 5])], opset=19)
    rng = np.random.default_rng(14)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["offset"] *= 1.5
    (expected,) = ReferenceEvaluator(model).run(None, feeds)
    got = compile_and_load(model, tmp_path)(*feeds.values())
    assert got.shape == expected.shape and max_abs(got, expected) < 1e-4


def test_stft_with_run_time_step_and_length(tmp_path):
    """One artifact, frame step and length chosen per call; and a windowed, two-sided STFT of a
    complex signal."""
    from onnx.reference import ReferenceEvaluator

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    plain = make_model([helper.make_node("STFT", ["x", "step", "", "length"], ["y"])],
                       [helper.make_tensor_value_info("x", f, [2, 64, 1]),
                        helper.make_tensor_value_info("step", i64, []),
                        helper.make_tensor_value_info("length", i64, [])],
                       [helper.make_tensor_value_info("y", f, [2, None, None, 2])], opset=17)
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 64, 1)).astype(np.float32)
    runtime = compile_and_load(plain, tmp_path / "plain")
    for step, length in ((8, 16), (5, 12)):
        feeds = {"x": x, "step": np.array(step), "length": np.array(length)}
        (expected,) = ReferenceEvaluator(plain).run(None, feeds)
        got = runtime(*feeds.values())
        assert got.shape == expected.shape and max_abs(got, expected) < 1e-4
    windowed = make_model([helper.make_node("STFT", ["x", "step", "window"], ["y"], onesided=0)],
                          [helper.make_tensor_value_info("x", f, [1, 40, 2]),
                           helper.make_tensor_value_info("step", i64, []),
                           helper.make_tensor_value_info("window", f, [10])],
                          [helper.make_tensor_value_info("y", f, [1, None, 10, 2])], opset=17)
    feeds = {"x": rng.standard_normal((1, 40, 2)).astype(np.float32), "step": np.array(6),
             "window": np.hanning(10).astype(np.float32)}
    (expected,) = ReferenceEvaluator(windowed).run(None, feeds)
    got = compile_and_load(windowed, tmp_path / "windowed")(*feeds.values())
    assert got.shape == expected.shape and max_abs(got, expected) < 1e-4


def test_mel_weight_matrix_with_run_time_parameters(tmp_path):
    from onnx.reference import ReferenceEvaluator

    names = ["mels", "dft", "rate", "low", "high"]
    types = [TensorProto.INT64] * 3 + [TensorProto.FLOAT] * 2
    model = make_model([helper.make_node("MelWeightMatrix", names, ["y"])],
                       [helper.make_tensor_value_info(n, t, []) for n, t in zip(names, types)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
                       opset=17)
    runtime = compile_and_load(model, tmp_path)
    for mels, dft, rate, low, high in ((8, 64, 16000, 20.0, 8000.0), (5, 30, 8000, 0.0, 3000.0)):
        feeds = {"mels": np.array(mels), "dft": np.array(dft), "rate": np.array(rate),
                 "low": np.array(low, np.float32), "high": np.array(high, np.float32)}
        (expected,) = ReferenceEvaluator(model).run(None, feeds)
        got = runtime(*feeds.values())
        assert got.shape == expected.shape and max_abs(got, expected) < 1e-6


def _reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def test_attention_with_grouped_heads_past_and_masks_matches_the_reference(tmp_path):
    """The ONNX Attention op (opset 23): 4 query heads over 2 key/value heads, a past cache of
    run-time length, causal plus a float mask, softcap, and the probabilities as a 4th output;
    one artifact at two lengths, against onnx.reference."""
    f = TensorProto.FLOAT
    node = helper.make_node("Attention", ["q", "k", "v", "mask", "past_k", "past_v"],
                            ["y", "present_k", "present_v", "probs"], is_causal=1,
                            softcap=3.0, qk_matmul_output_mode=3)
    model = make_model([node], [
        helper.make_tensor_value_info("q", f, [2, 4, "seq", 8]),
        helper.make_tensor_value_info("k", f, [2, 2, "seq", 8]),
        helper.make_tensor_value_info("v", f, [2, 2, "seq", 8]),
        helper.make_tensor_value_info("mask", f, ["seq", "total"]),
        helper.make_tensor_value_info("past_k", f, [2, 2, "past", 8]),
        helper.make_tensor_value_info("past_v", f, [2, 2, "past", 8])],
        [helper.make_tensor_value_info(n, f, [None] * 4) for n in ("y", "present_k",
                                                                   "present_v", "probs")],
        opset=23)
    runtime = compile_and_load(model, tmp_path)
    rng = np.random.default_rng(23)
    for seq, past in ((3, 5), (1, 9)):
        feeds = {"q": rng.standard_normal((2, 4, seq, 8)), "k": rng.standard_normal((2, 2, seq, 8)),
                 "v": rng.standard_normal((2, 2, seq, 8)),
                 "mask": np.where(rng.random((seq, past + seq)) < 0.2, -np.inf, 0.0),
                 "past_k": rng.standard_normal((2, 2, past, 8)),
                 "past_v": rng.standard_normal((2, 2, past, 8))}
        feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
        expected = _reference(model, feeds)
        got = runtime(*feeds.values())
        for name, g, e in zip(("y", "present_k", "present_v", "probs"), got, expected):
            assert g.shape == e.shape and np.allclose(g, e, atol=1e-5), (name, max_abs(g, e))


def test_attention_3d_with_padding_and_a_window_zeroes_fully_masked_rows(tmp_path):
    """3-D inputs split into heads, a short boolean mask padded to the keys, nonpad_kv_seqlen
    and a sliding window (opset 25); the row every key is masked from gives zeros, not NaN."""
    f = TensorProto.FLOAT
    node = helper.make_node("Attention", ["q", "k", "v", "mask", "", "", "nonpad"], ["y"],
                            q_num_heads=2, kv_num_heads=2, left_window_size=2)
    model = make_model([node], [
        helper.make_tensor_value_info("q", f, [2, 4, 16]),
        helper.make_tensor_value_info("k", f, [2, 6, 16]),
        helper.make_tensor_value_info("v", f, [2, 6, 12]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, [4, 5]),
        helper.make_tensor_value_info("nonpad", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", f, [2, 4, 12])], opset=25)
    rng = np.random.default_rng(25)
    mask = rng.random((4, 5)) < 0.8
    mask[1] = False
    feeds = {"q": rng.standard_normal((2, 4, 16)), "k": rng.standard_normal((2, 6, 16)),
             "v": rng.standard_normal((2, 6, 12))}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    feeds |= {"mask": mask, "nonpad": np.array([6, 4], np.int64)}
    (expected,) = _reference(model, feeds)
    got = compile_and_load(model, tmp_path)(*feeds.values())
    assert not np.isnan(got).any() and np.allclose(got, expected, atol=1e-5), max_abs(got, expected)
    assert np.all(got[:, 1] == 0)  # query 1 sees no key


def test_reshape_topk_and_onehot_with_sizes_given_at_run_time(tmp_path):
    """Reshape to a shape tensor with 0 (copy) and -1 (infer) entries, TopK of a run-time k and
    OneHot of a run-time depth (float indices, one negative, one out of range), each given per
    call, against onnx.reference."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["reshaped"]),
             helper.make_node("TopK", ["x_flat", "k"], ["top_values", "top_indices"], largest=0),
             helper.make_node("OneHot", ["hot_indices", "depth", "on_off"], ["hot"], axis=0)]
    model = make_model(nodes, [
        helper.make_tensor_value_info("x", f, [2, 3, 4]),
        helper.make_tensor_value_info("shape", i64, [3]),
        helper.make_tensor_value_info("x_flat", f, [3, 7]),
        helper.make_tensor_value_info("k", i64, [1]),
        helper.make_tensor_value_info("hot_indices", f, [4]),
        helper.make_tensor_value_info("depth", f, []),
        helper.make_tensor_value_info("on_off", f, [2])],
        [helper.make_tensor_value_info("reshaped", f, [None] * 3),
         helper.make_tensor_value_info("top_values", f, [3, None]),
         helper.make_tensor_value_info("top_indices", i64, [3, None]),
         helper.make_tensor_value_info("hot", f, [None, 4])], opset=21)
    runtime = compile_and_load(model, tmp_path)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    x_flat = rng.standard_normal((3, 7)).astype(np.float32)
    x_flat[0, 2] = x_flat[0, 5]  # a tie: the lower index first
    for shape, k, depth in (([0, -1, 2], 3, 5.0), ([4, 0, -1], 7, 3.0), ([-1, 1, 1], 1, 8.0)):
        feeds = {"x": x, "shape": np.array(shape, np.int64), "x_flat": x_flat,
                 "k": np.array([k], np.int64), "hot_indices": np.array([0, 2, -1, 9], np.float32),
                 "depth": np.array(depth, np.float32), "on_off": np.array([-2, 5], np.float32)}
        expected = _reference(model, feeds)
        got = runtime(*feeds.values())
        for g, e in zip(got, expected):
            assert g.shape == e.shape and np.array_equal(g, e), (shape, k, depth, g, e)


def test_reduce_max_of_a_fully_masked_row_is_minus_infinity(tmp_path):
    """ReduceMax over a row of -inf is -inf (TVM's reduction starts at the lowest finite float),
    which an exported attention graph compares against to zero fully masked rows."""
    model = make_model([helper.make_node("ReduceMax", ["x"], ["y"], keepdims=0, axes=[1]),
                        helper.make_node("ReduceMin", ["x"], ["z"], keepdims=1)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
                        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1])], opset=13)
    x = np.array([[-np.inf] * 3, [1.0, -np.inf, 2.0], [np.inf] * 3], np.float32)
    y, z = compile_and_load(model, tmp_path)(x)
    assert np.array_equal(y, [-np.inf, 2.0, np.inf]) and np.array_equal(z, [[-np.inf]])


def test_float16_matmul_and_softmax_accumulate_in_float32(tmp_path):
    """A 4096-term float16 product (and a softmax over 4096) within a float16 rounding of the
    float32 result, as ONNX Runtime gives; summing in float16 is off by far more."""
    h = TensorProto.FLOAT16
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["c"]),
                        helper.make_node("Softmax", ["a"], ["p"], axis=-1)],
                       [helper.make_tensor_value_info("a", h, [4, 4096]),
                        helper.make_tensor_value_info("b", h, [4096, 8])],
                       [helper.make_tensor_value_info("c", h, [4, 8]),
                        helper.make_tensor_value_info("p", h, [4, 4096])], opset=13)
    rng = np.random.default_rng(16)
    a = rng.random((4, 4096)).astype(np.float16)
    b = rng.random((4096, 8)).astype(np.float16)
    c, p = compile_and_load(model, tmp_path)(a, b)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.allclose(c.astype(np.float64), exact, rtol=2e-3), max_abs(c, exact)
    weights = np.exp(a.astype(np.float64) - a.max(-1, keepdims=True))
    softmax = weights / weights.sum(-1, keepdims=True)
    assert np.allclose(p.astype(np.float64), softmax, rtol=2e-3, atol=1e-7), max_abs(p, softmax)


def test_rms_normalization_over_every_axis(tmp_path):
    model = make_model([helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=0)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
                        helper.make_tensor_value_info("scale", TensorProto.FLOAT, [3, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], opset=23)
    rng = np.random.default_rng(3)
    x, scale = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2))
    got = compile_and_load(model, tmp_path)(x, scale)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5) * scale
    assert np.allclose(got, expected, rtol=1e-5), max_abs(got, expected)


def test_float8_casts_round_to_nearest_even_and_saturate_as_onnx_does(tmp_path):
    """Every float8 type, both ways, with and without saturation, on values that round up, to
    even, into subnormals, past the largest finite value, and on inf/NaN, against ml_dtypes
    (what onnx.reference casts with); TVM's own conversions get 0 and NaN wrong."""
    import ml_dtypes

    values = np.array([0.0, -0.0, 0.47892547, 1.0625, 1.1875, 3e-3, -7e-4, 1e-7, 239.0, 250.0,
                       448.0, 470.0, 1e6, -1e6, 57344.0, 61440.0, np.inf, -np.inf, np.nan],
                      np.float32)
    for onnx_type, name in ((TensorProto.FLOAT8E4M3FN, "float8_e4m3fn"),
                            (TensorProto.FLOAT8E4M3FNUZ, "float8_e4m3fnuz"),
                            (TensorProto.FLOAT8E5M2, "float8_e5m2"),
                            (TensorProto.FLOAT8E5M2FNUZ, "float8_e5m2fnuz")):
        dtype = getattr(ml_dtypes, name)
        info = ml_dtypes.finfo(dtype)
        nodes = [helper.make_node("Cast", ["x"], ["saturated"], to=onnx_type),
                 helper.make_node("Cast", ["x"], ["wrapped"], to=onnx_type, saturate=0),
                 helper.make_node("Cast", ["saturated"], ["back"], to=TensorProto.FLOAT)]
        model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [19])],
                           [helper.make_tensor_value_info("saturated", onnx_type, [19]),
                            helper.make_tensor_value_info("wrapped", onnx_type, [19]),
                            helper.make_tensor_value_info("back", TensorProto.FLOAT, [19])],
                           opset=19)
        saturated, wrapped, back = compile_and_load(model, tmp_path / name)(values)
        expected = np.clip(values, float(info.min), float(info.max)).astype(dtype)
        for got, want in ((saturated, expected), (wrapped, values.astype(dtype)),
                          (back, expected.astype(np.float32))):
            same = (got.astype(np.float32) == want.astype(np.float32)) | (
                np.isnan(got.astype(np.float32)) & np.isnan(want.astype(np.float32)))
            assert same.all(), (name, values[~same], got[~same], want[~same])


def test_quantize_linear_to_float8_and_with_blocked_scales_matches_the_reference(tmp_path):
    f = TensorProto.FLOAT
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero_f8"], ["q8"]),
             helper.make_node("DequantizeLinear", ["q8", "scale", "zero_f8"], ["dq8"]),
             helper.make_node("QuantizeLinear", ["x", "block_scale", "block_zero"], ["qb"],
                              axis=1, block_size=2),
             helper.make_node("DequantizeLinear", ["qb", "block_scale", "block_zero"], ["dqb"],
                              axis=1, block_size=2)]
    rng = np.random.default_rng(8)
    initializers = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                    helper.make_tensor("zero_f8", TensorProto.FLOAT8E4M3FN, [], [0.0]),
                    numpy_helper.from_array(rng.uniform(0.01, 0.1, (3, 3)).astype(np.float32),
                                            "block_scale"),
                    numpy_helper.from_array(rng.integers(-5, 5, (3, 3)).astype(np.int8),
                                            "block_zero")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", f, [3, 5])],
                       [helper.make_tensor_value_info("q8", TensorProto.FLOAT8E4M3FN, [3, 5]),
                        helper.make_tensor_value_info("dq8", f, [3, 5]),
                        helper.make_tensor_value_info("qb", TensorProto.INT8, [3, 5]),
                        helper.make_tensor_value_info("dqb", f, [3, 5])], initializers, opset=21)
    x = (rng.standard_normal((3, 5)) * 4).astype(np.float32)
    x[0, 0] = 100.0  # saturates both
    expected = _reference(model, {"x": x})
    got = compile_and_load(model, tmp_path)(x)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and np.array_equal(g.astype(np.float32), e.astype(np.float32)), \
            (g, e)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_with_weights_and_ignored_targets_match_the_reference(reduction, tmp_path):
    """SoftmaxCrossEntropyLoss (with its log-probability output) and NegativeLogLikelihoodLoss
    over [N, C, d] with class weights and an ignore_index."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("SoftmaxCrossEntropyLoss", ["x", "target", "weight"],
                              ["sce", "log_prob"], reduction=reduction, ignore_index=2),
             helper.make_node("NegativeLogLikelihoodLoss", ["log_prob", "target"], ["nll"],
                              reduction=reduction)]
    loss_shape = [] if reduction != "none" else [3, 4]
    model = make_model(nodes, [helper.make_tensor_value_info("x", f, [3, 5, 4]),
                               helper.make_tensor_value_info("target", i64, [3, 4]),
                               helper.make_tensor_value_info("weight", f, [5])],
                       [helper.make_tensor_value_info("sce", f, loss_shape),
                        helper.make_tensor_value_info("log_prob", f, [3, 5, 4]),
                        helper.make_tensor_value_info("nll", f, loss_shape)], opset=13)
    rng = np.random.default_rng(12)
    feeds = {"x": rng.standard_normal((3, 5, 4)).astype(np.float32),
             "target": rng.integers(0, 5, (3, 4)).astype(np.int64),
             "weight": rng.uniform(0.5, 2, 5).astype(np.float32)}
    feeds["target"][0, :2] = 2  # ignored
    expected = _reference(model, feeds)
    got = compile_and_load(model, tmp_path)(*feeds.values())
    for g, e in zip(got, expected):
        assert g.shape == e.shape and np.allclose(g, e, rtol=1e-5, atol=1e-6), (g, e)


def _recent_op_cases():
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    rng = np.random.default_rng(26)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    info = helper.make_tensor_value_info
    yield ("rotary interleaved, partial, position ids", 23,
           [helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "ids"], ["y"], interleaved=1,
                             rotary_embedding_dim=4)],
           [info("x", f, [2, 3, 5, 6]), info("cos", f, [8, 2]), info("sin", f, [8, 2]),
            info("ids", i64, [2, 5])], [info("y", f, [2, 3, 5, 6])],
           {"x": normal(2, 3, 5, 6), "cos": normal(8, 2), "sin": normal(8, 2),
            "ids": rng.integers(0, 8, (2, 5)).astype(np.int64)})
    yield ("rotary 3-D halves", 23,
           [helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], num_heads=2)],
           [info("x", f, [2, 5, 8]), info("cos", f, [2, 5, 2]), info("sin", f, [2, 5, 2])],
           [info("y", f, [2, 5, 8])],
           {"x": normal(2, 5, 8), "cos": normal(2, 5, 2), "sin": normal(2, 5, 2)})
    yield ("tensor scatter, circular", 24,
           [helper.make_node("TensorScatter", ["cache", "update", "at"], ["y"], mode="circular")],
           [info("cache", f, [2, 3, 6, 4]), info("update", f, [2, 3, 3, 4]),
            info("at", i64, [2])], [info("y", f, [2, 3, 6, 4])],
           {"cache": normal(2, 3, 6, 4), "update": normal(2, 3, 3, 4),
            "at": np.array([1, 5], np.int64)})
    yield ("cumprod, run-time axis, reverse exclusive", 26,
           [helper.make_node("CumProd", ["x", "axis"], ["y"], reverse=1, exclusive=1)],
           [info("x", f, [3, 4]), info("axis", i64, [])], [info("y", f, [3, 4])],
           {"x": normal(3, 4), "axis": np.array(-1, np.int64)})
    yield ("swiglu", 28, [helper.make_node("SwiGLU", ["a", "b"], ["y"], alpha=1.5)],
           [info("a", f, [3, 4]), info("b", f, [3, 4])], [info("y", f, [3, 4])],
           {"a": normal(3, 4), "b": normal(3, 4)})
    yield ("bitcast, reverse sequence, celu, elu", 26,
           [helper.make_node("BitCast", ["x"], ["bits"], to=TensorProto.INT32),
            helper.make_node("ReverseSequence", ["x", "lengths"], ["reversed"], batch_axis=0,
                             time_axis=1),
            helper.make_node("Celu", ["x"], ["celu"], alpha=0.7),
            helper.make_node("Elu", ["x"], ["elu"], alpha=0.3)],
           [info("x", f, [3, 4]), info("lengths", i64, [3])],
           [info("bits", TensorProto.INT32, [3, 4]), info("reversed", f, [3, 4]),
            info("celu", f, [3, 4]), info("elu", f, [3, 4])],
           {"x": normal(3, 4), "lengths": np.array([4, 1, 3], np.int64)})


@pytest.mark.parametrize("case", list(_recent_op_cases()), ids=lambda case: case[0])
def test_recent_onnx_ops_match_the_reference(case, tmp_path):
    _, opset, nodes, inputs, outputs, feeds = case
    model = make_model(nodes, inputs, outputs, opset=opset)
    expected = _reference(model, feeds)
    got = compile_and_load(model, tmp_path)(*feeds.values())
    got = got if isinstance(got, tuple) else (got,)
    for output, g, e in zip(outputs, got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, (output.name, g.dtype, e.dtype)
        assert np.allclose(g, e, rtol=1e-5, atol=1e-6), (output.name, max_abs(g, e))


@pytest.mark.parametrize("rule", ["linear", "gated_delta"])
def test_linear_attention_and_causal_conv_match_the_reference(rule, tmp_path):
    """The opset-27 recurrent layers: LinearAttention with grouped heads and a past state
    (per-head decay and beta for the gated delta rule), CausalConvWithState with a past state
    and SiLU."""
    f = TensorProto.FLOAT
    info = helper.make_tensor_value_info
    attention_inputs = ["q", "k", "v", "state"] + (["decay", "beta"] if rule != "linear" else [])
    nodes = [helper.make_node("LinearAttention", attention_inputs, ["y", "new_state"],
                              q_num_heads=4, kv_num_heads=2, update_rule=rule),
             helper.make_node("CausalConvWithState", ["x", "w", "bias", "conv_state"],
                              ["conv", "new_conv_state"], activation="silu")]
    inputs = [info("q", f, [2, 5, 16]), info("k", f, [2, 5, 8]), info("v", f, [2, 5, 6]),
              info("state", f, [2, 2, 4, 3])]
    inputs += [info("decay", f, [2, 5, 2]), info("beta", f, [2, 5, 2])] if rule != "linear" else []
    inputs += [info("x", f, [2, 3, 7]), info("w", f, [3, 1, 4]), info("bias", f, [3]),
               info("conv_state", f, [2, 3, 3])]
    model = make_model(nodes, inputs, [info("y", f, [2, 5, 12]), info("new_state", f, [2, 2, 4, 3]),
                                       info("conv", f, [2, 3, 7]),
                                       info("new_conv_state", f, [2, 3, 3])], opset=27)
    rng = np.random.default_rng(27)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
             .astype(np.float32) for i in inputs}
    if rule != "linear":
        feeds["decay"] = -np.abs(feeds["decay"])
        feeds["beta"] = 1 / (1 + np.exp(-feeds["beta"]))
    expected = _reference(model, feeds)
    got = compile_and_load(model, tmp_path)(*feeds.values())
    for g, e in zip(got, expected):
        assert g.shape == e.shape and np.allclose(g, e, rtol=1e-4, atol=1e-5), max_abs(g, e)


def test_flex_attention_with_grouped_heads_and_modifier_graphs(tmp_path):
    """ai.onnx.preview.FlexAttention, written out before import: 4 query heads over 2
    key/value heads, a score_mod subgraph (tanh soft-capping with its own constant) and a
    prob_mod subgraph, against onnx.reference."""
    f = TensorProto.FLOAT
    info = helper.make_tensor_value_info
    cap = numpy_helper.from_array(np.array(2.0, np.float32), "cap")
    score_mod = helper.make_graph(
        [helper.make_node("Div", ["s", "cap"], ["d"]), helper.make_node("Tanh", ["d"], ["t"]),
         helper.make_node("Mul", ["t", "cap"], ["capped"])], "score_mod",
        [info("s", f, None)], [info("capped", f, None)], initializer=[cap])
    prob_mod = helper.make_graph([helper.make_node("Sqrt", ["p"], ["root"])], "prob_mod",
                                 [info("p", f, None)], [info("root", f, None)])
    node = helper.make_node("FlexAttention", ["q", "k", "v"], ["y"], domain="ai.onnx.preview",
                            score_mod=score_mod, prob_mod=prob_mod, scale=0.3)
    graph = helper.make_graph([node], "g", [info("q", f, [2, 4, 5, 8]), info("k", f, [2, 2, 6, 8]),
                                            info("v", f, [2, 2, 6, 3])],
                              [info("y", f, [2, 4, 5, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid("ai.onnx.preview", 1)])
    model.ir_version = 10
    rng = np.random.default_rng(1)
    feeds = {"q": rng.standard_normal((2, 4, 5, 8)), "k": rng.standard_normal((2, 2, 6, 8)),
             "v": rng.standard_normal((2, 2, 6, 3))}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    (expected,) = _reference(model, feeds)
    got = compile_and_load(model, tmp_path)(*feeds.values())
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5), \
        max_abs(got, expected)
