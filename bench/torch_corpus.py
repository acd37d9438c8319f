"""torch.export corpus: 16 transformers architectures through graft, checked against PyTorch.

Each model is built from a small `transformers` config with random weights (seeded), exported
with a dynamic batch dim (and sequence or audio length where the model has one), compiled once,
and run from that one artifact at two shapes that differ from the export's in every dynamic dim.
A model passes when, at both shapes, its output matches PyTorch eager within 1e-3 of the
output's scale (max |graft - torch| / max |torch|).

    python bench/torch_corpus.py [-k PATTERN] [--keep-going]

Prints one line per model and the count that passed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

TOLERANCE = 1e-3
TEXT_SHAPES = [(2, 12), (3, 7), (1, 19)]  # (batch, seq): the export's, then the two checked


@dataclass
class Case:
    name: str
    build: Callable  # () -> torch.nn.Module whose forward takes tensors and returns one
    inputs: Callable  # (batch, length, seed) -> tuple of tensors
    dynamic: dict  # input index -> {axis: dim name}
    shapes: list = None  # [(batch, length)] x 3: export, check, check
    dims: Callable = None  # () -> {dim name: torch.export.Dim or derived dim}, where not plain

    def __post_init__(self):
        self.shapes = self.shapes or TEXT_SHAPES


def _output(model, field="last_hidden_state", with_mask=False):
    """The model as a module of positional tensors returning one tensor (torch.export's
    dynamic_shapes are given per parameter)."""
    import torch

    class Output(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return getattr(self.model(x), field)

    class OutputWithMask(Output):
        def forward(self, input_ids, attention_mask):
            return getattr(self.model(input_ids, attention_mask=attention_mask), field)

    return OutputWithMask() if with_mask else Output()


def _text(model_class, config_class, mask=True, **config):
    import torch

    def build():
        torch.manual_seed(0)
        cfg = config_class(**config)
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        return _output(model_class(cfg).eval(), with_mask=mask)

    def inputs(batch, seq, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 500, (batch, seq), generator=g)
        if not mask:
            return (ids,)
        attention = torch.ones(batch, seq, dtype=torch.int64)
        attention[-1, seq - seq // 3:] = 0  # the last row padded at the end
        return ids, attention

    dynamic = {0: {0: "batch", 1: "seq"}}
    if mask:
        dynamic[1] = {0: "batch", 1: "seq"}
    return build, inputs, dynamic


def _vision(model_class, config_class, side, channels=3, field="last_hidden_state", **config):
    import torch

    def build():
        torch.manual_seed(0)
        return _output(model_class(config_class(**config)).eval(), field)

    def inputs(batch, _, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, channels, side, side, generator=g),)

    return build, inputs, {0: {0: "batch"}}


def cases() -> list[Case]:
    import transformers as tf

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=64)
    decoder = dict(small, num_key_value_heads=2)
    result = [
        Case("BERT", *_text(tf.BertModel, tf.BertConfig, **small)),
        Case("RoBERTa", *_text(tf.RobertaModel, tf.RobertaConfig, **small, pad_token_id=1)),
        Case("DistilBERT", *_text(tf.DistilBertModel, tf.DistilBertConfig, dim=64, n_layers=2,
                                  n_heads=4, hidden_dim=128, vocab_size=512,
                                  max_position_embeddings=64)),
        Case("GPT-2", *_text(tf.GPT2Model, tf.GPT2Config, n_embd=64, n_layer=2, n_head=4,
                             vocab_size=512, n_positions=64)),
        Case("Llama", *_text(tf.LlamaModel, tf.LlamaConfig, **decoder)),
        Case("Qwen2", *_text(tf.Qwen2Model, tf.Qwen2Config, **decoder)),
        Case("Mistral", *_text(tf.MistralModel, tf.MistralConfig, **decoder, sliding_window=8)),
        Case("Phi", *_text(tf.PhiModel, tf.PhiConfig, **small)),
        Case("T5 encoder", *_text(tf.T5EncoderModel, tf.T5Config, d_model=64, d_kv=16,
                                  num_heads=4, d_ff=128, num_layers=2, vocab_size=512)),
        Case("ViT", *_vision(tf.ViTModel, tf.ViTConfig, 32, image_size=32, patch_size=8,
                             hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128)),
        Case("Swin", *_vision(tf.SwinModel, tf.SwinConfig, 32, image_size=32, patch_size=4,
                              embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4)),
        Case("ConvNeXT", *_vision(tf.ConvNextModel, tf.ConvNextConfig, 32, num_channels=3,
                                  hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
        Case("ResNet", *_vision(tf.ResNetModel, tf.ResNetConfig, 32, embedding_size=16,
                                hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")),
        Case("MobileNetV2", *_vision(tf.MobileNetV2Model, tf.MobileNetV2Config, 32, image_size=32,
                                     depth_multiplier=0.35)),
        whisper_encoder(tf),
        wav2vec2(tf),
    ]
    return result


def whisper_encoder(tf) -> Case:
    import torch

    config = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                  num_mel_bins=16, max_source_positions=32, vocab_size=512, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)

    def build():
        torch.manual_seed(0)
        return _output(tf.WhisperModel(tf.WhisperConfig(**config)).get_encoder().eval())

    def inputs(batch, _, seed):  # the encoder takes exactly 2 x max_source_positions frames
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 16, 64, generator=g),)

    return Case("Whisper encoder", build, inputs, {0: {0: "batch"}})


def wav2vec2(tf) -> Case:
    import torch

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                  conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  do_stable_layer_norm=True, feat_extract_norm="layer")

    def build():
        torch.manual_seed(0)
        return _output(tf.Wav2Vec2Model(tf.Wav2Vec2Config(**config)).eval())

    def inputs(batch, samples, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, samples, generator=g),)

    def dims():  # torch.export proves the feature encoder's lengths only for multiples of 10
        return {"samples": 10 * torch.export.Dim("tens_of_samples", min=3, max=1000)}

    return Case("Wav2Vec2", build, inputs, {0: {0: "batch", 1: "samples"}},
                shapes=[(2, 400), (3, 330), (1, 520)], dims=dims)


def dynamic_shapes_of(case: Case, example):
    import torch

    dims = case.dims() if case.dims else {}
    limits = {"seq": 64}  # the text configs' max_position_embeddings
    spec = []
    for index in range(len(example)):
        axes = case.dynamic.get(index)
        if axes is None:
            spec.append(None)
            continue
        spec.append({axis: dims.setdefault(name, torch.export.Dim(name, min=1,
                                                                  max=limits.get(name, 1024)))
                     for axis, name in axes.items()})
    return tuple(spec)


def check(case: Case, scratch: str) -> tuple[bool, str]:
    import numpy as np
    import torch

    import graft

    model = case.build()
    (b0, n0), *checked = case.shapes
    example = case.inputs(b0, n0, 0)
    started = time.time()
    compiled = graft.compile(model, example, dynamic_shapes=dynamic_shapes_of(case, example))
    compile_s = time.time() - started
    path = os.path.join(scratch, re.sub(r"\W", "_", case.name))
    compiled.save(path)
    runtime = graft.load(path)
    errors = []
    for seed, (batch, length) in enumerate(checked, start=1):
        inputs = case.inputs(batch, length, seed)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        got = runtime(*[t.numpy() for t in inputs])
        if got.shape != expected.shape:
            return False, f"shape {got.shape} vs torch {expected.shape} at {batch}x{length}"
        scale = max(float(np.abs(expected).max()), 1e-30)
        errors.append(float(np.abs(got.astype(np.float64) - expected).max()) / scale)
    has_length = any(len(axes) > 1 for axes in case.dynamic.values())
    shapes = ", ".join(f"{b}x{n}" if has_length else f"batch {b}" for b, n in checked)
    detail = (f"compile {compile_s:5.1f} s; max error / scale at {shapes}: "
              + ", ".join(f"{e:.1e}" for e in errors))
    return all(e <= TOLERANCE for e in errors), detail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", help="only models whose name matches this regex")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from graft import progress

    progress.set_enabled(False)
    selected = [c for c in cases() if not args.pattern or re.search(args.pattern, c.name, re.I)]
    passed = 0
    with tempfile.TemporaryDirectory() as scratch:
        for case in selected:
            try:
                ok, detail = check(case, scratch)
            except Exception as err:  # noqa: BLE001 - report every model, then go on
                ok = False
                detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                if args.verbose:
                    traceback.print_exc()
            passed += ok
            print(f"{'PASS' if ok else 'FAIL'}  {case.name:16s} {detail}", flush=True)
    print(f"torch corpus: {passed}/{len(selected)} architectures compile and match PyTorch "
          f"within {TOLERANCE:g} of the output scale at two shapes from one artifact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
