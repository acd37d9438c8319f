import os
import sys
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    """A small MLP with a buffer: Linear → +buffer → GELU → Linear → softmax."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 4)
            self.register_buffer("shift", torch.linspace(-1, 1, 16))

        def forward(self, x):
            return torch.softmax(self.fc2(torch.nn.functional.gelu(self.fc1(x) + self.shift)), -1)

    return Tiny().eval()


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory):
    """The tiny model compiled with a symbolic batch dim, saved, and its path."""
    import torch

    import graft

    path = tmp_path_factory.mktemp("art") / "tiny"
    compiled = graft.compile(tiny_model, (torch.randn(3, 8),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    compiled.save(path)
    return path


# a script preamble after which torch, onnx, onnxruntime and transformers cannot be imported
BLOCK_TORCH = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "transformers"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, *args, env=None, timeout=300):
    """Run `code` in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def exact_integer_ops(model):
    """An ONNX model with each MatMulInteger / ConvInteger written as float ops: Cast, minus the
    zero points, MatMul in float64 (Conv in float32: onnxruntime has no float64 Conv; exact
    while |sums| < 2**24), Cast back to int32.

    onnxruntime's x86 kernels for uint8 x int8 add pairs of products in int16 and saturate
    (measured with onnxruntime 1.32 here: MiniLM's first query projection off by 4751 of 67800
    in int32), so onnxruntime on the original model is not the ONNX semantics; onnxruntime on
    this one is."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "ConvInteger"):
            nodes.append(node)
            continue
        is_conv = node.op_type == "ConvInteger"
        float_type = TensorProto.FLOAT if is_conv else TensorProto.DOUBLE
        base = node.output[0] + "_exact"
        operands = []
        for operand, zero_point_index in ((0, 2), (1, 3)):
            value = f"{base}_{operand}"
            nodes.append(helper.make_node("Cast", [node.input[operand]], [value], to=float_type))
            if len(node.input) > zero_point_index and node.input[zero_point_index]:
                zero_point = f"{base}_{operand}_zero_point"
                nodes.append(helper.make_node("Cast", [node.input[zero_point_index]],
                                              [zero_point], to=float_type))
                if is_conv and operand == 1:  # per output channel: along axis 0 of the weight
                    shape = f"{base}_channel_shape"
                    model.graph.initializer.append(
                        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), shape))
                    nodes.append(helper.make_node("Reshape", [zero_point, shape],
                                                  [zero_point + "_per_channel"]))
                    zero_point += "_per_channel"
                nodes.append(helper.make_node("Sub", [value, zero_point], [value + "_centered"]))
                value += "_centered"
            operands.append(value)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(helper.make_node("Conv" if is_conv else "MatMul", operands, [base], **attrs))
        nodes.append(helper.make_node("Cast", [base], [node.output[0]], to=TensorProto.INT32))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
