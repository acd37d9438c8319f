"""CUDA: the build must succeed on any machine (nvcc is enough); running needs a GPU."""

import shutil

import pytest
import torch
import tvm

import graft
from graft.runtime.errors import ArtifactError

from conftest import max_abs

HAS_NVCC = shutil.which("nvcc") is not None
HAS_GPU = tvm.cuda(0).exist


@pytest.fixture(scope="module")
def cuda_artifact(tiny_model, tmp_path_factory):
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed: CUDA code cannot be generated here")
    path = tmp_path_factory.mktemp("cuda") / "tiny"
    compiled = graft.compile(tiny_model, (torch.randn(2, 8),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, target="cuda")
    compiled.save(path)
    return path


def test_cuda_build_writes_an_artifact(cuda_artifact):
    from graft.runtime.artifact import read_manifest

    manifest = read_manifest(cuda_artifact)
    assert manifest["device"] == "cuda" and manifest["target"]["kind"] == "cuda"
    assert (cuda_artifact / "model.so").stat().st_size > 0


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible: the artifact loads here")
def test_cuda_artifact_without_gpu_says_so(cuda_artifact):
    with pytest.raises(ArtifactError, match="built for CUDA, but no CUDA GPU is visible"):
        graft.load(cuda_artifact)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")
def test_cuda_artifact_matches_pytorch(tiny_model, cuda_artifact):
    runtime = graft.load(cuda_artifact)
    for batch in (1, 5):
        x = torch.randn(batch, 8)
        assert max_abs(runtime(x), tiny_model(x).detach().numpy()) < 1e-5
