"""Sparsify benchmark: latency and accuracy of graft's pruned builds against graft's own dense
fp32 build, in one process on the same inputs.

    all-MiniLM-L6-v2 (real weights), batch 8, seq 128: structured pruning of the feed-forward
        channels (`Sparsify("ffn_channels")`) at a budget of cosine >= 0.95 (the per-token
        hidden states against the original's, on calibration sentences; activation-aware
        importance and the least-squares refit), and, at the fraction that search reached,
        magnitude-only pruning without the refit. Accuracy: mean cosine similarity of the
        mean-pooled sentence embeddings to PyTorch fp32 on 256 held-out sentences (English
        text from `pydoc_data.topics`, disjoint from the calibration sentences).

Each latency is a median over at least --runs timed calls after warm-up, the builds timed in
alternating blocks so a noisy neighbour hits them alike.

    python bench/bench_sparsify.py [--runs 20] [--budget cosine>=0.95]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import interleaved_medians, load_minilm  # noqa: E402
from bench_quantize import embedding_cosine, english_sentences, minilm_batches  # noqa: E402

warnings.filterwarnings("ignore")

def bench_minilm(workdir: Path, runs: int, budget: str):
    import torch

    import graft
    from graft import passes as P

    module, tokenizer = load_minilm()
    batch, seq = 8, 128
    sentences = english_sentences()
    calibration_sentences, held_out = sentences[:128], sentences[-256:]

    calibration = minilm_batches(tokenizer, calibration_sentences, batch, seq)
    evaluation = minilm_batches(tokenizer, held_out, batch, seq)
    example = tuple(torch.from_numpy(a) for a in calibration[0])

    def build(name, passes):
        started = time.perf_counter()
        compiled = graft.compile(module, example, passes=passes,
                                 calibration=calibration if passes else None)
        print(f"MiniLM {name}: graft compile {time.perf_counter() - started:.1f} s", flush=True)
        compiled.save(workdir / name)
        did = next((p["did"] for p in compiled.manifest["passes"] if p["pass"] == "sparsify"),
                   {})
        return graft.load(workdir / name), did

    runtimes, reports = {}, {}
    runtimes["dense"], _ = build("dense", [])
    runtimes["pruned"], reports["pruned"] = build(
        "pruned", [P.Sparsify("ffn_channels", budget=budget)])
    ratio = reports["pruned"]["ratio"]
    runtimes["magnitude"], reports["magnitude"] = build(
        "magnitude", [P.Sparsify("ffn_channels", ratio=ratio, importance="magnitude",
                                 correct=False)])

    feed = list(calibration[0])
    calls = {name: (lambda f, t: lambda: f.run_tvm(*t))(rt.main, rt.main.check_inputs(feed))
             for name, rt in runtimes.items()}
    ms = interleaved_medians(calls, runs)
    for name in ("dense", "pruned", "magnitude"):
        value, count = embedding_cosine(module, runtimes[name], evaluation)
        report = reports.get(name, {})
        label = {"dense": "graft fp32 dense",
                 "pruned": f"ffn channels, {budget} (activation-aware, refit)",
                 "magnitude": "ffn channels, same fraction (magnitude, no refit)"}[name]
        extra = ""
        if report:
            extra = (f"  FFN channels removed {report['sparsity']:.1%}, FFN weight bytes "
                     f"{report['weight_bytes']['after'] / report['weight_bytes']['before']:.2f}x")
            if "held_out_value" in report:
                extra += f"  [pass measured {report['metric']} {report['held_out_value']:.4f}" \
                         " on held-out calibration]"
        print(f"MiniLM (8, 128) {label}: {ms[name]:7.2f} ms ({ms[name] / ms['dense']:.2f}x "
              f"dense)  embedding cosine vs torch fp32 {value:.5f} ({count} held-out "
              f"sentences){extra}", flush=True)

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget", default="cosine>=0.95")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        bench_minilm(Path(tmp), args.runs, args.budget)
    return 0

if __name__ == "__main__":
    sys.exit(main())
