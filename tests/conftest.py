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
