"""ONNX models quantized by onnxruntime's own tools, compiled by graft, compared with ONNX Runtime.

- quantize_static (QDQ format) of MTCNN's ONet with its real weights: graft executes the
  QuantizeLinear/DequantizeLinear graph as the ONNX spec defines it, so it must equal ONNX
  Runtime run without graph optimizations (which executes the same graph node by node).
  Optimized ONNX Runtime fuses the pairs into int8 kernels with their own rounding.
- quantize_dynamic of ONet (ConvInteger, MatMulInteger, DynamicQuantizeLinear), against ONNX
  Runtime running the model with those integer ops computed exactly (`exact_integer_ops`).
  (all-MiniLM-L6-v2 quantized both ways: tests/test_minilm.py.)
- QLinearConv / QLinearMatMul / ConvInteger by hand with per-channel scales and zero points,
  compared with ONNX's reference implementation (onnx.reference), bit for bit. ONNX Runtime's
  x86 kernel for uint8 activations times int8 weights adds pairs of products in int16 and
  saturates (the reason its quantizer warns about QInt8 weights in the QOperator format): on the
  full-range weights used here it is off by up to 52 steps, so it is not the reference there.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graft
from graft.frontend.onnx_frontend import save_for_onnxruntime

from conftest import exact_integer_ops, max_abs

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")


def ort_session(path, optimized=True):
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compile_and_load(path, tmp_path, name="art"):
    graft.compile(path).save(tmp_path / name)
    return graft.load(tmp_path / name)


def as_list(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


@pytest.fixture(scope="module")
def onet_onnx(tmp_path_factory):
    import torch

    from test_mtcnn import face_crops, mtcnn_module

    net = mtcnn_module().ONet().eval()
    folder = tmp_path_factory.mktemp("onet")
    exported = folder / "exported.onnx"
    torch.onnx.export(net, (torch.from_numpy(face_crops(2, 48, 0)),), str(exported),
                      input_names=["x"], opset_version=17, dynamic_axes={"x": {0: "batch"}},
                      dynamo=False)
    path = folder / "onet.onnx"
    save_for_onnxruntime(onnx.load(str(exported)), path)
    return path


def onet_inputs():
    from test_mtcnn import face_crops

    return [face_crops(batch, 48, seed) for batch, seed in ((1, 10), (5, 11))]


def test_quantize_static_qdq_onet(onet_onnx, tmp_path):
    from test_mtcnn import face_crops

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": face_crops(4, 48, seed)} for seed in range(8)])

        def get_next(self):
            return next(self.batches, None)

    path = tmp_path / "onet_qdq.onnx"
    quantization.quantize_static(str(onet_onnx), str(path), Calibration(),
                                 quant_format=quantization.QuantFormat.QDQ,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    runtime = compile_and_load(path, tmp_path)
    reference = ort_session(path, optimized=False)
    for x in onet_inputs():
        expected = reference.run(None, {"x": x})
        for got, want in zip(as_list(runtime(x)), expected, strict=True):
            assert got.shape == want.shape
            assert max_abs(got, want) < 1e-5


def test_quantize_dynamic_onet(onet_onnx, tmp_path):
    path = tmp_path / "onet_dynamic.onnx"
    quantization.quantize_dynamic(str(onet_onnx), str(path),
                                  weight_type=quantization.QuantType.QInt8)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= ops
    runtime = compile_and_load(path, tmp_path)
    exact = tmp_path / "onet_dynamic_exact.onnx"
    save_for_onnxruntime(exact_integer_ops(onnx.load(str(path))), exact)
    reference = ort_session(exact)
    for x in onet_inputs():
        expected = reference.run(None, {"x": x})
        for got, want in zip(as_list(runtime(x)), expected, strict=True):
            assert got.shape == want.shape
            assert max_abs(got, want) < 1e-5


def quantized_model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "q", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_qlinearconv_per_channel_with_bias_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.uint8(120), "x_zp"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, 6).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(6, np.int8), "w_zp"),
        numpy_helper.from_array(np.float32(0.05), "y_scale"),
        numpy_helper.from_array(np.uint8(128), "y_zp"),
        numpy_helper.from_array(rng.integers(-3000, 3000, 6).astype(np.int32), "bias"),
    ]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp",
                                            "y_scale", "y_zp", "bias"], ["y"],
                            pads=[1, 1, 1, 1], strides=[2, 1])
    model = quantized_model([node], [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                   ["n", 3, 9, 8])],
                            [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", 6, 5, 8])], inits)
    path = tmp_path / "qlinearconv.onnx"
    save_for_onnxruntime(model, path)
    runtime = compile_and_load(path, tmp_path)
    reference = ReferenceEvaluator(model)
    for batch in (1, 3):
        x = rng.integers(0, 256, (batch, 3, 9, 8)).astype(np.uint8)
        (expected,) = reference.run(None, {"x": x})
        got = runtime(x)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected)


def test_qlinearmatmul_and_convinteger(tmp_path):
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(np.float32(0.03), "a_scale"),
        numpy_helper.from_array(np.uint8(100), "a_zp"),
        numpy_helper.from_array(rng.integers(0, 256, (16, 5)).astype(np.uint8), "b"),
        numpy_helper.from_array(np.float32(0.01), "b_scale"),
        numpy_helper.from_array(np.uint8(130), "b_zp"),
        numpy_helper.from_array(np.float32(0.4), "y_scale"),
        numpy_helper.from_array(np.uint8(10), "y_zp"),
        numpy_helper.from_array(rng.integers(0, 256, (4, 2, 2, 2)).astype(np.uint8), "w"),
        numpy_helper.from_array(np.uint8(3), "x_zp"),
        numpy_helper.from_array(np.uint8(127), "w_zp"),
    ]
    nodes = [
        helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp",
                                           "y_scale", "y_zp"], ["y"]),
        helper.make_node("ConvInteger", ["image", "w", "x_zp", "w_zp"], ["conv"], pads=[0, 1, 0, 1]),
    ]
    model = quantized_model(
        nodes, [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", 16]),
                helper.make_tensor_value_info("image", TensorProto.UINT8, [2, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["m", 5]),
         helper.make_tensor_value_info("conv", TensorProto.INT32, [2, 4, 4, 6])], inits)
    path = tmp_path / "qmatmul.onnx"
    save_for_onnxruntime(model, path)
    runtime = compile_and_load(path, tmp_path)
    a = rng.integers(0, 256, (7, 16)).astype(np.uint8)
    image = rng.integers(0, 256, (2, 2, 5, 5)).astype(np.uint8)
    got_y, got_conv = runtime(a, image)
    for session in (ReferenceEvaluator(model), ort_session(path)):
        expected_y, expected_conv = session.run(None, {"a": a, "image": image})
        assert np.array_equal(got_y, expected_y)
        assert np.array_equal(got_conv, expected_conv)
