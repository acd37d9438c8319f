"""Causal language models (Hugging Face transformers, Llama family first) exported for
generation: `prefill` and `decode` entry points with the KV cache as explicit tensors.

    prefill(input_ids[1, T], position_ids[1, T], past_k[L, 1, H, P, D], past_v)
    decode (input_ids[1, 1], position_ids[1, 1], past_k, past_v)
        -> (logits of the last position [1, V], new_k[L, 1, H, P + T, D], new_v)
    score  (as prefill) -> (logits of every position [1, T, V], new_k, new_v); only with
        `scores=True` (perplexity; Quantize's accuracy measurement)
    draft  (as decode, on the first k layers' cache [k, 1, H, P, D]) -> the logits of the
        model's own final norm and head applied after layer k, and those layers' new cache;
        only with `draft_layers=k` (self-speculative decoding, runtime/speculative.py)

Both are exported from one wrapper module with torch.export and share one set of weights.
Known pitfalls, handled here: transformers needs an explicit all-ones attention_mask (without
it, it emits a shapeless bool cumsum that TVM cannot build); the past cache is built by
assigning tensors to the cache layers (concatenating onto an empty tensor breaks import); the
past length is `Dim.DYNAMIC` (a named Dim trips a torch guard).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from graft.frontend.imported import FunctionSignature, ImportedModel
from graft.runtime.signature import TensorSpec
from graft.runtime.errors import GraftError, ModelLoadError


def load_hf_causal_lm(source):
    """A transformers model and tokenizer from a .gguf file or a model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".gguf":
            kwargs = {"gguf_file": path.name}
            directory = str(path.parent)
        else:
            kwargs, directory = {}, str(path)
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                         **kwargs)
    except Exception as err:
        first = str(err).strip().splitlines()
        raise ModelLoadError(f"could not load {str(path)!r} as a causal language model: "
                             f"{type(err).__name__}: {first[0] if first else ''}") from None
    return model.eval(), tokenizer


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses a .gguf file three times (config, tokenizer, weights), each
    time reading the 49k-entry vocabulary one numpy element at a time, and rebuilds gguf's
    tensor-name table for every submodule: about 25 of SmolLM2-135M's 35 s of loading.
    Within this block both are memoized; the reader maps the file read-only."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _wrapper(model, all_logits: bool = False):
    import torch

    from graft.frontend.layer_split import explicit_cache

    class ExplicitCacheLM(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, position_ids, past_k, past_v):
            past_len, new_len = past_k.shape[3], input_ids.shape[1]
            cache = explicit_cache(self.lm.config, past_k, past_v)
            mask = torch.ones(input_ids.shape[0], past_len + new_len, dtype=torch.long)
            out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True,
                          logits_to_keep=0 if all_logits else 1)
            new_k = torch.stack([layer.keys for layer in cache.layers])
            new_v = torch.stack([layer.values for layer in cache.layers])
            return (out.logits if all_logits else out.logits[:, 0, :]), new_k, new_v

    return ExplicitCacheLM(model).eval()


def cache_config(model) -> dict:
    config = model.config
    heads = config.num_attention_heads
    return {
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "vocab_size": int(config.vocab_size),
        "cache_dtype": "float32",
    }


def import_causal_lm(source, *, max_seq_len=None, converters=None, scores: bool = False,
                     speculative=None, token_exit=None, calibration=None) -> ImportedModel:
    """`speculative`: "auto" (draft depth and length chosen on `calibration`, token id
    sequences; no draft when it predicts no speedup) or a draft depth k (always compiled; the
    draft length is chosen on `calibration` when given). See passes/early_exit/speculative.py.
    `token_exit`: a top-1 agreement budget ("top1>=0.98"), optionally with the exit layer
    ("top1>=0.98@24"): per-token exit, its threshold calibrated on `calibration`; see
    passes/early_exit/token_exit.py."""
    import torch

    from graft.frontend import torch_frontend as tf

    if isinstance(source, (str, os.PathLike)):
        model, tokenizer = load_hf_causal_lm(source)
        name = Path(source).name
    else:
        model, tokenizer, name = source, None, type(source).__name__
    cache = cache_config(model)
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    max_seq_len = int(max_seq_len or limit)
    if max_seq_len > limit:
        raise GraftError(f"max_seq_len {max_seq_len} exceeds the model's context length {limit}")
    choice = _speculation(model, speculative, calibration)
    if choice is not None and choice["enabled"]:
        scores = True  # the verify pass
    exit_choice, exit_held_out = _token_exit(model, token_exit, calibration)
    if exit_choice is not None:
        scores = True  # the full model's tokens, for the held-out check
    wrapper = _wrapper(model)
    layers, heads, head_dim = cache["num_layers"], cache["num_kv_heads"], cache["head_dim"]
    dyn = torch.export.Dim.DYNAMIC

    def past(length):
        return torch.zeros(layers, 1, heads, length, head_dim)

    ids = torch.ones(1, 5, dtype=torch.long)
    positions = torch.arange(3, 8).unsqueeze(0)
    dynamic = {"input_ids": {1: dyn}, "position_ids": {1: dyn}, "past_k": {3: dyn},
               "past_v": {3: dyn}}
    ep = tf.export_module(wrapper, (ids, positions, past(3), past(3)), dynamic)
    prefill = tf.import_exported_program(ep, converters=converters, function_name="prefill")
    sig = prefill.signatures["prefill"]
    rename_dims(sig, {str(sig.inputs[0].shape[1]): "new_tokens",
                      str(sig.inputs[2].shape[3]): "past_len"})
    imported = with_decode(prefill)
    if scores:  # logits of every position: perplexity, and Quantize's accuracy measurement
        ep = tf.export_module(_wrapper(model, all_logits=True),
                              (ids, positions, past(3), past(3)), dynamic)
        score = tf.import_exported_program(ep, converters=converters, function_name="score")
        sig = score.signatures["score"]
        rename_dims(sig, {str(sig.inputs[0].shape[1]): "new_tokens",
                          str(sig.inputs[2].shape[3]): "past_len"})
        if list(sig.params) != list(imported.signatures["prefill"].params):
            raise GraftError("the score function's weights differ from prefill's")
        imported.mod["score"] = score.mod["score"]
        imported.signatures["score"] = sig
    if choice is not None and choice["enabled"]:
        add_draft(imported, model, choice["draft_layers"], converters)
    if exit_choice is not None:
        add_token_exit(imported, model, exit_choice["layer"], converters)
        imported.held_out["token_exit"] = exit_held_out
    for function, sig in imported.signatures.items():
        if not function.startswith("exit_"):  # those name their own outputs
            for spec, name_ in zip(sig.outputs, ("logits", "new_k", "new_v")):
                spec.name = name_
    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    imported.source = {"frontend": "torch.export", "model": name,
                       "architecture": type(model).__name__,
                       "causal_lm": {**cache, "max_seq_len": max_seq_len,
                                     "eos_token_ids": [int(e) for e in eos]}}
    if exit_choice is not None:
        imported.source["causal_lm"]["token_exit"] = exit_choice
    if choice is not None:
        imported.source["causal_lm"]["speculative"] = choice
        if choice["enabled"]:
            imported.source["causal_lm"]["draft_layers"] = choice["draft_layers"]
    if tokenizer is not None:
        imported.extra_files = {"tokenizer.json": tokenizer.backend_tokenizer.to_str().encode()}
    return imported


def _speculation(model, speculative, calibration) -> dict | None:
    from graft import progress
    from graft.passes.early_exit import speculative as spec

    if speculative is None:
        return None
    if speculative != "auto" and not (isinstance(speculative, int) and speculative > 0):
        raise GraftError(f"speculative must be 'auto' or a draft depth (a layer count), got "
                         f"{speculative!r}")
    layers = None if speculative == "auto" else int(speculative)
    if layers is not None:
        first_layers(model, layers)  # checks the depth
    sequences = token_sequences(calibration)
    if not sequences:
        if layers is None:
            raise GraftError("speculative='auto' chooses the draft on calibration text: give "
                             "token id sequences (calibration=[ids, ...], or --calibration "
                             "with an input_ids array)")
        return {"draft_layers": layers, "draft_tokens": spec.MAX_DRAFT_TOKENS // 2,
                "draft_cost": round(float(spec.draft_cost_by_layer(model)[layers - 1]), 4),
                "enabled": True, "calibrated": False}
    count = sum(len(s) for s in sequences)
    with progress.step(f"calibrating self-speculative decoding on {count} tokens"):
        choice = spec.calibrate(model, sequences, draft_layers=layers)
    choice["calibrated"] = True
    summary = (f"best draft: {choice['draft_layers']} layers, {choice['draft_tokens']} tokens, "
               f"acceptance {choice['acceptance']:.2f}, predicted speedup "
               f"{choice['predicted_speedup']:.2f}x")
    if not choice["enabled"]:
        choice["reason"] = f"calibration predicts no speedup ({summary}); no draft compiled"
        progress.note(f"self-speculative decoding left off: {choice['reason']}")
    else:
        progress.note(f"self-speculative decoding: {summary}")
    return choice


def _token_exit(model, token_exit, calibration):
    """(the calibrated choice, the held-out token sequences the compile checks it on)."""
    from graft import progress
    from graft.passes.early_exit import token_exit as calm

    if token_exit is None:
        return None, None
    budget, _, layer = str(token_exit).partition("@")
    if layer and not layer.isdigit():
        raise GraftError(f"token_exit {token_exit!r}: expected BUDGET or BUDGET@LAYER, e.g. "
                         "top1>=0.98@24")
    sequences = token_sequences(calibration)
    if not sequences:
        raise GraftError("token_exit calibrates its threshold on text: give token id sequences "
                         "(calibration=[ids, ...], or --calibration with an input_ids array)")
    fit, held_out = calm.split_held_out(sequences)
    count = sum(len(s) for s in fit)
    with progress.step(f"calibrating the per-token exit on {count} tokens"):
        choice = calm.calibrate(model, fit, budget, int(layer) if layer else None)
    progress.note(f"per-token exit after layer {choice['layer']}, threshold "
                  f"{choice['threshold']:.3f}: {choice['exit_rate']:.1%} of calibration "
                  f"tokens exit, agreement {choice['agreement']:.4f}, predicted step time "
                  f"{1 / choice['predicted_speedup']:.2f}x the full model's"
                  + (" (slower: too few tokens exit to pay for the exit head)"
                     if choice["predicted_speedup"] < 1 else ""))
    return choice, held_out


def add_token_exit(imported: ImportedModel, model, layer: int, converters=None) -> None:
    """Add exit_lower, exit_upper and exit_skip (frontend/layer_split.py) at `layer`."""
    import torch

    from graft.frontend import layer_split
    from graft.frontend import torch_frontend as tf

    cache = cache_config(model)
    heads, head_dim, total = cache["num_kv_heads"], cache["head_dim"], cache["num_layers"]
    dyn = torch.export.Dim.DYNAMIC

    def past(count):
        return torch.zeros(count, 1, heads, 3, head_dim)

    hidden = torch.zeros(1, int(model.config.hidden_size))
    position = torch.tensor([[3]])
    examples = {"exit_lower": (torch.ones(1, 1, dtype=torch.long), position, past(layer),
                               past(layer)),
                "exit_upper": (hidden, position, past(total - layer), past(total - layer)),
                "exit_skip": (hidden, position, past(total - layer), past(total - layer))}
    for name, module in layer_split.wrappers(model, layer).items():
        first = "input_ids" if name == "exit_lower" else "hidden"
        ep = tf.export_module(module, examples[name],
                              {first: None, "position_ids": None, "past_k": {3: dyn},
                               "past_v": {3: dyn}})
        part = tf.import_exported_program(ep, converters=converters, function_name=name)
        sig = part.signatures[name]
        # past_k and past_v may carry two symbols (exit_skip never relates them): one name
        rename_dims(sig, {str(sig.inputs[2].shape[3]): "past_len",
                          str(sig.inputs[3].shape[3]): "past_len"})
        extra = [p for p in sig.params if p not in imported.params]
        if extra:
            raise GraftError(f"the {name} function's weights are not the model's: {extra[:3]}")
        outputs = {"exit_lower": ("logits", "hidden", "new_k", "new_v"),
                   "exit_upper": ("logits", "new_k", "new_v"),
                   "exit_skip": ("new_k", "new_v")}[name]
        for spec, output in zip(sig.outputs, outputs):
            spec.name = output
        imported.mod[name] = part.mod[name]
        imported.signatures[name] = sig


def token_sequences(calibration) -> list:
    """Token id sequences from calibration samples: arrays of ids, or tuples / dicts whose
    first / `input_ids` entry is one (each row of a 2-D array is a sequence)."""
    import numpy as np

    sequences = []
    for sample in calibration or []:
        if isinstance(sample, dict):
            sample = sample.get("input_ids", next(iter(sample.values()), None))
        elif isinstance(sample, (tuple, list)) and sample and not np.isscalar(sample[0]):
            sample = sample[0]
        ids = np.asarray(sample)
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
            raise GraftError(f"calibration for a language model is token ids (integer arrays "
                             f"of shape [T] or [rows, T]), got {ids.dtype} {list(ids.shape)}")
        sequences.extend(ids.reshape(-1, ids.shape[-1]).astype(np.int64))
    return sequences


def first_layers(model, count: int):
    """A shallow copy of a decoder LM that runs only its first `count` layers, then its own
    final norm and head; it shares every parameter (and its names) with `model`."""
    import copy

    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise GraftError(f"draft layers need a decoder LM with model.model.layers (Llama, "
                         f"Qwen2, Mistral, ...), not {type(model).__name__}")
    if not 1 <= count < len(layers):
        raise GraftError(f"draft_layers must be 1 to {len(layers) - 1} (the model has "
                         f"{len(layers)} layers), got {count}")
    truncated = copy.copy(model)
    truncated._modules = dict(model._modules)
    inner = copy.copy(model.model)
    inner._modules = dict(model.model._modules)
    inner.layers = torch.nn.ModuleList(list(layers)[:count])
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = count
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:count]
    inner.config = truncated.config = config
    truncated.model = inner
    return truncated.eval()


def add_draft(imported: ImportedModel, model, count: int, converters=None) -> None:
    """Add `draft`: the decode step of the first `count` layers and the model's head."""
    import torch

    from graft.frontend import torch_frontend as tf

    cache = cache_config(model)
    dyn = torch.export.Dim.DYNAMIC
    past = torch.zeros(count, 1, cache["num_kv_heads"], 3, cache["head_dim"])
    ep = tf.export_module(_wrapper(first_layers(model, count)),
                          (torch.ones(1, 5, dtype=torch.long), torch.arange(3, 8).unsqueeze(0),
                           past, past.clone()),
                          {"input_ids": {1: dyn}, "position_ids": {1: dyn}, "past_k": {3: dyn},
                           "past_v": {3: dyn}})
    draft = tf.import_exported_program(ep, converters=converters, function_name="draft")
    sig = draft.signatures["draft"]
    rename_dims(sig, {str(sig.inputs[2].shape[3]): "past_len"})
    extra = [p for p in sig.params if p not in imported.params]
    if extra:
        raise GraftError(f"the draft function's weights are not the model's: {extra[:3]}")
    bound = with_decode(draft, "draft", "draft")
    imported.mod["draft"] = bound.mod["draft"]
    imported.signatures["draft"] = bound.signatures["draft"]


def with_decode(prefill: ImportedModel, source: str = "prefill",
                name: str = "decode") -> ImportedModel:
    """Add `decode` (or `name`): the function `source` with the new-token count bound to 1, so
    its matmuls are matrix-vector products."""
    import tvm
    from tvm import relax

    func = prefill.mod[source]
    new_tokens = func.params[0].ty.shape.values[1]
    copy = tvm.ir.load_json(tvm.ir.save_json(func))  # no Vars shared between the functions
    decode_mod = tvm.IRModule({tvm.ir.GlobalVar(name): copy.with_attr("global_symbol", name)})
    decode_mod = relax.transform.BindSymbolicVars({new_tokens.name: 1})(decode_mod)
    mod = prefill.mod.clone()
    existing = next((gv for gv in mod.get_global_vars() if gv.name_hint == name), None)
    mod[existing or tvm.ir.GlobalVar(name)] = decode_mod[name]
    signatures = dict(prefill.signatures)
    sig = prefill.signatures[source]
    renamed = str(sig.inputs[0].shape[1])

    def bind(specs):
        return [TensorSpec(s.name, [_substitute(d, renamed, "1") for d in s.shape], s.dtype)
                for s in specs]

    signatures[name] = FunctionSignature(bind(sig.inputs), bind(sig.outputs), list(sig.params))
    return ImportedModel(mod, prefill.params, signatures, prefill.source)


def _substitute(dim, name: str, value: str):
    if not isinstance(dim, str):
        return dim
    if dim == name:
        return int(value) if value.isdigit() else value
    return re.sub(rf"\b{re.escape(name)}\b", value, dim)


def rename_dims(sig: FunctionSignature, names: dict[str, str]) -> None:
    """Give symbolic dims readable names in a signature (`s41` -> `past_len`)."""
    for spec in sig.inputs + sig.outputs:
        new_shape = []
        for dim in spec.shape:
            for old, new in names.items():
                dim = _substitute(dim, old, new)
            new_shape.append(dim)
        spec.shape = new_shape
