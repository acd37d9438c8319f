"""Sparsify benchmark: latency and accuracy of graft's pruned builds against graft's own dense
fp32 build, in one process on the same inputs.

    all-MiniLM-L6-v2 (real weights), batch 8, seq 128: structured pruning of the feed-forward
        channels (`Sparsify("ffn_channels")`) at a budget of cosine >= 0.95 (the per-token
        hidden states against the original's, on calibration sentences; activation-aware
        importance and the least-squares refit), and, at the fraction that search reached,
        magnitude-only pruning without the refit. Accuracy: mean cosine similarity of the
        mean-pooled sentence embeddings to PyTorch fp32 on 256 held-out sentences (English
        text from `pydoc_data.topics`, disjoint from the calibration sentences).

    Kernels, (M, K, N) = (1024, 384, 1536) and (1024, 1536, 384), random weights: graft's dense
        fp32 product against the same layer pruned by magnitude (`Sparsify("bsr")` at 75% and
        90% of its blocks, `Sparsify("1:4")`, and unstructured at 75% and 90%), each compiled by graft as a one-layer model;
        every result is compared with numpy's dense product (in float64) of the weight pruned
        here, the largest difference printed relative to the largest output.

    SmolLM2-135M (real weights): 2:4 on every linear layer (the tied embedding / LM head stays
        dense), activation-aware (Wanda's mask, then SparseGPT's correction; and SparseGPT's
        own mask choice), next to magnitude-only 2:4 (no correction): decode step latency (past 128) against graft's dense fp32 build, and
        perplexity on held-out `pydoc_data.topics` text (calibration: the text's first 1024
        tokens, as bench_quantize).

    Composition, MiniLM (8, 128): FFN channels pruned (25%, activation-aware, refit), then W8A8
        (static, smoothed) in one compile, against each alone and dense fp32.

Each latency is a median over at least --runs timed calls after warm-up, the builds timed in
alternating blocks so a noisy neighbour hits them alike.

    python bench/bench_sparsify.py [--runs 20] [--budget cosine>=0.95] [--only kernels|minilm|smollm|compose]
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
from bench_quantize import (decode_feed, embedding_cosine, english_sentences,  # noqa: E402
                            minilm_batches, perplexity, smollm_text)

warnings.filterwarnings("ignore")

KERNEL_SHAPES = ((1024, 384, 1536), (1024, 1536, 384))
KERNEL_CASES = (("bsr", "16x1", 0.75), ("bsr", "32x1", 0.75), ("bsr", "64x1", 0.75),
                ("bsr", "16x1", 0.9), ("bsr", "32x1", 0.9), ("bsr", "64x1", 0.9),
                ("1:4", None, 0.75), ("unstructured", None, 0.75),
                ("unstructured", None, 0.9))


def pruned_by_magnitude(w, pattern: str, block, ratio: float):
    """W [N, K] with the pattern's weights of least magnitude zeroed, computed here (not by
    graft): the reference the sparse kernels are checked against."""
    import numpy as np

    n, k = w.shape
    if pattern == "bsr":
        bn, bk = (int(v) for v in block.split("x"))
        scores = np.abs(w.astype(np.float64)).reshape(n // bn, bn, k // bk, bk).sum(axis=(1, 3))
        keep = np.zeros(scores.size, bool)
        keep[np.argsort(-scores.ravel(), kind="stable")[:int(round(scores.size * (1 - ratio)))]] \
            = True
        mask = np.kron(keep.reshape(scores.shape), np.ones((bn, bk), bool))
    elif pattern == "unstructured":  # each row its own weights of largest magnitude
        order = np.argsort(-np.abs(w), axis=1, kind="stable")[:, :int(round(k * (1 - ratio)))]
        mask = np.zeros((n, k), bool)
        np.put_along_axis(mask, order, True, axis=1)
    else:
        kept, group = (int(v) for v in pattern.split(":"))
        order = np.argsort(-np.abs(w).reshape(n, k // group, group), axis=2, kind="stable")
        mask = np.zeros((n, k // group, group), bool)
        np.put_along_axis(mask, order[:, :, :kept], True, axis=2)
        mask = mask.reshape(n, k)
    return w * mask


def bench_kernels(workdir: Path, runs: int):
    import numpy as np
    import torch

    import graft
    from graft import passes as P

    gen = np.random.default_rng(0)
    for m, k, n in KERNEL_SHAPES:
        layer = torch.nn.Linear(k, n, bias=False).eval()
        w = gen.standard_normal((n, k)).astype(np.float32)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
        x = gen.standard_normal((m, k)).astype(np.float32)
        runtimes, references = {}, {}
        for pattern, block, ratio in (("dense", None, 0.0), *KERNEL_CASES):
            name = {"bsr": f"bsr {block} {ratio:.0%}",
                    "unstructured": f"unstr. {ratio:.0%}"}.get(pattern, pattern)
            where = workdir / f"{m}x{k}x{n} {name}"
            passes = [] if pattern == "dense" else [
                P.Sparsify(pattern, ratio=ratio, importance="magnitude",
                           **({"block": block} if block else {}))]
            graft.compile(layer, (torch.from_numpy(x),), passes=passes).save(where)
            runtimes[name] = graft.load(where)
            pruned = w if pattern == "dense" else pruned_by_magnitude(w, pattern, block, ratio)
            references[name] = x.astype(np.float64) @ pruned.astype(np.float64).T
        calls = {name: (lambda f, t: lambda: f.run_tvm(*t))(rt.main, rt.main.check_inputs([x]))
                 for name, rt in runtimes.items()}
        # short blocks in many rounds: this machine's speed drifts over seconds
        ms = interleaved_medians(calls, 3 * runs, rounds=3 * runs // 4)
        for name, rt in runtimes.items():
            reference = references[name]
            error = float(np.abs(rt(x) - reference).max() / np.abs(reference).max())
            print(f"kernel (M, K, N) = ({m}, {k}, {n}) {name:>13}: {ms[name]:7.3f} ms  "
                  f"{ms['dense'] / ms[name]:5.2f}x faster than graft dense  max |error| vs numpy "
                  f"(float64, pruned weight) {error:.1e} of max |y|", flush=True)


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

def bench_compose(workdir: Path, runs: int):
    import torch

    import graft
    from graft import passes as P

    module, tokenizer = load_minilm()
    sentences = english_sentences()
    calibration = minilm_batches(tokenizer, sentences[:128], 8, 128)
    evaluation = minilm_batches(tokenizer, sentences[-256:], 8, 128)
    example = tuple(torch.from_numpy(a) for a in calibration[0])
    builds = {"fp32 dense": [],
              "ffn channels 25%": [P.Sparsify("ffn_channels", ratio=0.25)],
              "W8A8": [P.Quantize("w8a8")],
              "ffn channels 25% + W8A8": [P.Sparsify("ffn_channels", ratio=0.25),
                                          P.Quantize("w8a8")]}
    runtimes = {}
    for name, passes in builds.items():
        started = time.perf_counter()
        compiled = graft.compile(module, example, passes=passes,
                                 calibration=calibration if passes else None)
        print(f"MiniLM {name}: graft compile {time.perf_counter() - started:.1f} s", flush=True)
        compiled.save(workdir / f"compose {name}")
        runtimes[name] = graft.load(workdir / f"compose {name}")
    feed = list(calibration[0])
    calls = {name: (lambda f, t: lambda: f.run_tvm(*t))(rt.main, rt.main.check_inputs(feed))
             for name, rt in runtimes.items()}
    ms = interleaved_medians(calls, 2 * runs, rounds=runs // 2)
    for name, runtime in runtimes.items():
        value, count = embedding_cosine(module, runtime, evaluation)
        print(f"MiniLM (8, 128) {name:>24}: {ms[name]:7.2f} ms ({ms[name] / ms['fp32 dense']:.2f}x"
              f" dense)  embedding cosine vs torch fp32 {value:.5f} ({count} held-out "
              "sentences)", flush=True)


def bench_smollm(workdir: Path, runs: int, eval_tokens: int):
    import graft
    from graft import passes as P

    imported, calibration, held_out = smollm_text(eval_tokens)

    builds = {"fp32": [], "2:4": [P.Sparsify("2:4")],
              "2:4 sparsegpt": [P.Sparsify("2:4", importance="hessian")],
              "2:4 magnitude": [P.Sparsify("2:4", importance="magnitude", correct=False)]}
    artifacts, reports = {}, {}
    for name, passes in builds.items():
        started = time.perf_counter()
        compiled = graft.compile(imported, passes=passes,
                                 calibration=calibration if passes else None)
        print(f"SmolLM2 {name}: graft compile {time.perf_counter() - started:.1f} s", flush=True)
        where = workdir / f"smollm {name}"
        compiled.save(where)
        artifacts[name] = graft.load(where)
        reports[name] = next((p["did"] for p in compiled.manifest["passes"]
                              if p["pass"] == "sparsify"), {})

    feed = decode_feed(imported)
    calls = {}
    for name, artifact in artifacts.items():
        fn = artifact.function("decode")
        calls[name] = (lambda f, t: lambda: f.run_tvm(*t))(fn, fn.check_inputs(feed))
    ms = interleaved_medians(calls, 3 * runs, rounds=3 * runs // 4)
    base, count = perplexity(artifacts["fp32"], held_out)
    for name, artifact in artifacts.items():
        ppl = perplexity(artifact, held_out)[0] if name != "fp32" else base
        report = reports[name]
        label = {"fp32": "fp32 dense", "2:4": "2:4 activation-aware (Wanda), corrected",
                 "2:4 sparsegpt": "2:4 SparseGPT (mask chosen during the correction)",
                 "2:4 magnitude": "2:4 magnitude only"}[name]
        extra = ""
        if report:
            extra = (f"  linear weights {report['sparsity']:.0%} zero, weight bytes "
                     f"{report['weight_bytes']['after'] / report['weight_bytes']['before']:.2f}x"
                     f" ({len(report['layers'])} layers; dense: "
                     f"{', '.join(report['kept_dense']) or 'none'})")
        print(f"SmolLM2 {label}: decode {ms[name]:7.2f} ms ({ms[name] / ms['fp32']:.2f}x "
              f"dense)  perplexity {ppl:7.3f} ({(ppl / base - 1) * 100:+.1f}% vs fp32, {count} "
              f"held-out tokens){extra}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget", default="cosine>=0.95")
    parser.add_argument("--only", choices=("kernels", "minilm", "smollm", "compose"))
    parser.add_argument("--eval-tokens", type=int, default=20480)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "kernels"):
            bench_kernels(Path(tmp), args.runs)
        if args.only in (None, "minilm"):
            bench_minilm(Path(tmp), args.runs, args.budget)
        if args.only in (None, "compose"):
            bench_compose(Path(tmp), args.runs)
        if args.only in (None, "smollm"):
            bench_smollm(Path(tmp), args.runs, args.eval_tokens)
    return 0

if __name__ == "__main__":
    sys.exit(main())
