"""MTCNN's PNet, RNet and ONet with their real weights (from facenet-pytorch's wheel), through
torch.export and through ONNX, compared with PyTorch eager at two batch sizes."""

import functools
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import graft

from conftest import max_abs

torch = pytest.importorskip("torch")

INPUT_SIDE = {"PNet": 12, "RNet": 24, "ONet": 48}
TOLERANCE = 1e-4


@functools.cache
def mtcnn_module():
    """facenet_pytorch's mtcnn.py without its package `__init__`, which imports torchvision.
    The module's only relative import (face-cropping helpers) is stubbed out. Loaded once per
    process: the stub packages it leaves in sys.modules have no spec to find the files by."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("facenet-pytorch is not installed (make setup installs it)")
    root = Path(spec.submodule_search_locations[0])
    for name in ("facenet_pytorch", "facenet_pytorch.models", "facenet_pytorch.models.utils"):
        package = sys.modules.get(name) or types.ModuleType(name)
        package.__path__ = []
        sys.modules.setdefault(name, package)
    helpers = types.ModuleType("facenet_pytorch.models.utils.detect_face")
    helpers.detect_face = helpers.extract_face = None
    sys.modules.setdefault(helpers.__name__, helpers)
    loader = importlib.util.spec_from_file_location("facenet_pytorch.models.mtcnn",
                                                    root / "models" / "mtcnn.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mtcnn():
    return mtcnn_module()


def face_crops(batch: int, side: int, seed: int) -> np.ndarray:
    """Smooth image-like crops scaled as MTCNN scales pixels, (x - 127.5) / 128."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 3, side // 4 + 1, side // 4 + 1))
    pixels = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :side, :side]
    pixels += rng.normal(0, 8, pixels.shape)
    return ((np.clip(pixels, 0, 255) - 127.5) / 128).astype(np.float32)


def eager(net, x):
    with torch.no_grad():
        outputs = net(torch.from_numpy(x))
    return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]


def assert_matches(runtime, net, side):
    for batch, seed in ((1, 0), (5, 1)):
        x = face_crops(batch, side, seed)
        got = runtime(x)
        got = list(got) if isinstance(got, (tuple, list)) else [got]
        expected = eager(net, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            assert max_abs(g, e) < TOLERANCE, (batch, max_abs(g, e))


@pytest.mark.parametrize("name", ["PNet", "RNet", "ONet"])
def test_torch_export_matches_pytorch(mtcnn, name, tmp_path):
    net = getattr(mtcnn, name)().eval()
    side = INPUT_SIDE[name]
    example = torch.from_numpy(face_crops(2, side, 2))
    compiled = graft.compile(net, (example,),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    compiled.save(tmp_path / "art")
    assert_matches(graft.load(tmp_path / "art"), net, side)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onet_through_onnx_matches_pytorch(mtcnn, dynamo, tmp_path):
    net = mtcnn.ONet().eval()
    example = torch.from_numpy(face_crops(2, 48, 3))
    path = tmp_path / "onet.onnx"
    if dynamo:
        torch.onnx.export(net, (example,), str(path), input_names=["x"], dynamo=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    else:
        torch.onnx.export(net, (example,), str(path), input_names=["x"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    compiled = graft.compile(path)
    compiled.save(tmp_path / "art")
    runtime = graft.load(tmp_path / "art")
    assert str(runtime.inputs[0]).split(":")[1].startswith("batch")
    assert_matches(runtime, net, 48)
