"""The `graft` command line (see README). Bad input ends with status 2 and one line;
--verbose shows the traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


# `graft compile` runs the compiler in a child process (this variable is set there): a crash
# inside TVM (a segfault, an abort) then ends in one error line, not in the death of the command
IN_CHILD = "GRAFT_COMPILE_CHILD"


def main(argv=None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    from graft import progress
    from graft.runtime.errors import GraftError

    if args.quiet:
        progress.set_enabled(False)
    if args.handler is _compile and os.environ.get(IN_CHILD) != "1":
        return _compile_in_child(argv, args)
    if os.environ.get(IN_CHILD) == "1" and not args.verbose:
        _plain_crashes()
    try:
        return args.handler(args) or 0
    except GraftError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"graft: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("graft: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is graft's bug or TVM's; keep it one line
        if args.verbose:
            traceback.print_exc()
        first = str(err).strip().splitlines()
        print(f"graft: internal error: {type(err).__name__}: {first[0] if first else ''} "
              "(run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _compile_in_child(argv: list[str], args) -> int:
    """Run this `graft compile` in a child process (stdin, stdout and stderr shared, so progress
    shows as usual); if the child dies of a signal, say so in one line, naming the step it was
    in, and remove what it left half-written."""
    from graft import progress

    with tempfile.NamedTemporaryFile("w+", prefix="graft-stage-", suffix=".txt") as stage:
        env = dict(os.environ, **{IN_CHILD: "1", progress.STAGE_FILE: stage.name,
                                  progress.PROGRESS: "1" if progress.enabled() else "0"})
        child = subprocess.Popen([sys.executable, "-m", "graft.cli", *argv], env=env)
        try:
            returncode = child.wait()
        except KeyboardInterrupt:  # the child got the terminal's SIGINT too, and says so
            try:
                returncode = child.wait(timeout=10)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                child.kill()
                returncode = 130
            _remove_partial_artifacts(Path(args.output))
            return 130 if returncode < 0 else returncode
        if returncode >= 0:
            return returncode
        stage.seek(0)
        where = stage.read().strip()
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    _remove_partial_artifacts(Path(args.output))
    print(f"graft: internal error: the compiler crashed ({name}) "
          f"{f'in step {where!r}' if where else 'while starting'}: a bug in graft or in TVM, "
          f"which this model set off{'' if args.verbose else ' (run with --verbose for the native stack)'}",
          file=sys.stderr)
    return EXIT_INTERNAL


def _remove_partial_artifacts(output: Path) -> None:
    import shutil

    for partial in output.parent.glob(f".{output.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _plain_crashes() -> None:
    """Without --verbose, a segfault in the child ends it quietly (the parent reports it);
    tvm_ffi's handler would print a native backtrace of several hundred lines."""
    import tvm  # noqa: F401 - installs tvm_ffi's handler, which this replaces

    signal.signal(signal.SIGSEGV, signal.SIG_DFL)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    common.add_argument("--quiet", action="store_true", help="no progress lines")
    parser = argparse.ArgumentParser(prog="graft", parents=[common], description=(
        "graft: an ahead-of-time compiler for trained neural networks, on Apache TVM."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", parents=[common], help="compile a model into an artifact")
    p.add_argument("model", help=".onnx, .pt2 (torch.export.save), .gguf or Hugging Face "
                                 "causal-LM directory")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
                   help="ONNX input spec, e.g. input_ids:batchxseq:int64 (symbolic dims are "
                        "names); overrides the graph's own")
    p.add_argument("--target", default="cpu",
                   help="cpu (this host), cuda, or a TVM target as JSON")
    p.add_argument("--dump-dir", help="write the module after every pass, and passes.json")
    p.add_argument("--max-seq-len", type=int, help="causal LMs: longest prompt + generation "
                                                   "(default: the model's context length)")
    p.add_argument("--kv-cache", choices=("explicit", "paged"), default="explicit",
                   help="causal LMs: the KV cache as tensors in and out of prefill/decode "
                        "(explicit), or TVM's paged cache owned by the runtime, for several "
                        "sequences at once (paged; CPU)")
    p.add_argument("--scores", action="store_true",
                   help="causal LMs: also compile `score`, the logits of every position "
                        "(perplexity; needed to quantize a language model to a perplexity budget)")
    p.add_argument("--tune", type=int, metavar="TRIALS",
                   help="CPU: search schedules with MetaSchedule, TRIALS per kernel with static "
                        "shapes, keeping a tuned kernel only where it measured faster than "
                        "graft's own; slow (tens of seconds a trial). Records are kept in "
                        "--tune-dir for later compiles; --tune 0 only applies them")
    p.add_argument("--tune-dir", metavar="DIR",
                   help="tuning database directory (default: $GRAFT_TUNE_DIR or "
                        "~/.cache/graft/tuning)")
    q = p.add_argument_group("quantization (linear layers)")
    q.add_argument("--quantize", choices=["int8", "int4", "fp16", "w8a8"],
                   help="int8: weights per output channel, symmetric; int4: weights group-wise "
                        "along the reduction axis, two per byte, a scale and an offset per "
                        "group; fp16: weights stored in half precision; w8a8: int8 weights and "
                        "int8 activations (SmoothQuant smoothing from --calibration)")
    q.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="int4 group size (default 32)")
    q.add_argument("--symmetric", action="store_true", help="int4 without per-group offsets")
    q.add_argument("--activations", choices=["static", "dynamic"], default="static",
                   help="w8a8: one scale per layer input from --calibration (default), or each "
                        "token's own scale computed at run time")
    q.add_argument("--smooth-alpha", default="auto",
                   help="w8a8: SmoothQuant strength 0..1, 'auto' (per layer input, the one "
                        "whose products stay closest on calibration data; default) or 'none'")
    q.add_argument("--budget", metavar="METRIC<=|>=VALUE",
                   help="accuracy budget measured on the calibration data against the original "
                        "model: perplexity<=RATIO, cosine>=VALUE or top1>=VALUE; the most "
                        "sensitive layers stay at --fallback until it holds")
    q.add_argument("--fallback", choices=["int8", "fp16", "fp32"],
                   help="precision for sensitive layers (default: int8 for int4, else fp32)")
    q.add_argument("--calibration", metavar="FILE.npz|DIR",
                   help="calibration samples: an .npz with one array per input name whose "
                        "first axis counts samples (a causal LM: input_ids [samples, tokens]), "
                        "or a directory of .npz files, one sample each")
    s = p.add_argument_group("sparsity (pruning, before quantization)")
    s.add_argument("--sparsify", metavar="ffn_channels|bsr|unstructured|N:M",
                   help="ffn_channels: remove whole intermediate channels of every "
                        "feed-forward block, ranked by activation x weight norm on "
                        "--calibration (weight norms without it), the kept down-projection "
                        "refitted by least squares; the dense products shrink. bsr: remove "
                        "the least important blocks (--sparse-block) of every linear layer, "
                        "stored block-sparse and run by a kernel that skips them. N:M (2:4, "
                        "1:4, 4:8, ...; M dividing 16): keep N of every M inputs of every "
                        "output. unstructured: remove --sparsity of every output's weights. "
                        "bsr, unstructured and N:M rank weights by |W| x ||x|| on --calibration "
                        "(|W| without it) and correct the kept ones by least squares")
    s.add_argument("--sparsity", type=float, metavar="FRACTION",
                   help="fraction of each block's channels (bsr: of each layer's blocks) to "
                        "remove (or give --sparsify-budget to search the most that budget "
                        "allows)")
    s.add_argument("--sparse-block", metavar="OUTxIN", default="16x1",
                   help="bsr's block, outputs x inputs, outputs a multiple of 16 (default "
                        "16x1; 32x1 and 64x1 run fastest)")
    s.add_argument("--sparsify-budget", metavar="METRIC<=|>=VALUE",
                   help="accuracy budget for --sparsify, measured on --calibration like "
                        "--budget")
    e = p.add_argument_group("early exit (classifiers)")
    e.add_argument("--early-exit", metavar="top1>=AGREEMENT",
                   help="exits after intermediate layers, heads fitted on --calibration inputs, "
                        "thresholds chosen so the outputs agree with the full model's top-1 at "
                        "least this often (e.g. top1>=0.99); a batch exits when every row is "
                        "confident")
    e.add_argument("--exit-layers", metavar="auto|N,N,...", default="auto",
                   help="where exits may go: 'auto' (chosen by expected cost), layer numbers "
                        "(3,6: after the 3rd and 6th weighted layer) or fractions of the "
                        "model's FLOPs (0.3,0.6)")
    e.add_argument("--exit-confidence", choices=["max_prob", "entropy"], default="max_prob",
                   help="the confidence test: largest softmax probability, or 1 - normalized "
                        "entropy")
    e.add_argument("--speculative", metavar="auto|K",
                   help="causal LMs: early-exit self-speculative decoding. auto measures on "
                        "--calibration text (an .npz of input_ids) how often the model's head "
                        "after each layer predicts its next token and compiles a draft of the "
                        "first K layers only where that predicts a speedup; K compiles that "
                        "draft regardless. `graft generate` then drafts, verifies and adapts "
                        "(the tokens are those of plain greedy decoding)")
    e.add_argument("--token-exit", metavar="top1>=AGREEMENT[@LAYER]",
                   help="causal LMs: per-token early exit (CALM-style): after LAYER (default: "
                        "chosen), a token whose head probability reaches a threshold "
                        "calibrated on --calibration text skips the remaining layers, which "
                        "get its K/V from the exiting hidden state; the top-1 agreement with "
                        "the full model is the budget")
    k = p.add_argument_group("KV sharing (causal LMs with --kv-cache paged)")
    k.add_argument("--share-kv", metavar="perplexity<=RATIO",
                   help="layers read an earlier layer's K/V, so the paged cache holds fewer "
                        "layers: chosen greedily on --calibration text while the perplexity "
                        "ratio against the original stays within the budget (implies --scores)")
    k.add_argument("--share-kv-groups", metavar="OWNER:READER,READER;...",
                   help="share these groups instead of searching (e.g. 20:21,22;24:25)")
    p.set_defaults(handler=_compile)

    p = sub.add_parser("run", parents=[common], help="run an artifact on inputs from a .npz file")
    p.add_argument("artifact")
    p.add_argument("--inputs", required=True, help=".npz with one array per input name "
                                                   "(or arr_0, arr_1, ... in order)")
    p.add_argument("--output", help=".npz to write the outputs to (default: print a summary)")
    p.add_argument("--function", help="entry point (default: main)")
    p.set_defaults(handler=_run)

    p = sub.add_parser("inspect", parents=[common], help="print an artifact's manifest")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("generate", parents=[common], help="generate text with a causal LM artifact")
    p.add_argument("artifact")
    p.add_argument("--prompt", required=True, action="append",
                   help="the prompt; several --prompt run together (a --kv-cache paged "
                        "artifact)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (the default) is greedy decoding (paged artifacts sample otherwise)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut (paged)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (paged)")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    p.add_argument("--speculative", choices=("auto", "on", "off"), default="auto",
                   help="artifacts compiled with --speculative: draft and verify (on), decode "
                        "plainly (off), or as the compile's calibration decided (auto)")
    p.add_argument("--token-exit", choices=("auto", "off"), default="auto",
                   help="artifacts compiled with --token-exit: exit per token (auto) or run "
                        "every layer (off)")
    p.set_defaults(handler=_generate)

    p = sub.add_parser("diff", parents=[common], help="what changed between two dumped steps")
    p.add_argument("a", help="a dump file (dumps/016_fold_constant.py), DIR/STEP (dumps/016 or "
                             "dumps/fold_constant), or a dump directory (its last step)")
    p.add_argument("b", help="the same, for the later step")
    p.add_argument("--lines", type=int, default=60, help="diff lines shown per function")
    p.set_defaults(handler=_diff)

    p = sub.add_parser("bench", parents=[common], help="time an artifact on random inputs")
    p.add_argument("artifact")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic dim (default 1)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--function", help="entry point (default: main)")
    p.add_argument("--profile", action="store_true", help="also print the kernels taking the "
                                                           "most time")
    p.add_argument("--top", type=int, default=15, help="kernels to list with --profile")
    p.add_argument("--compare", choices=["onnxruntime", "torch"],
                   help="also time the original model with ONNX Runtime (all graph "
                        "optimizations) or PyTorch eager, on the same inputs, interleaved, and "
                        "print the ratio")
    p.add_argument("--model", help="with --compare: the .onnx file (onnxruntime) or the .pt2 "
                                   "file (torch) the artifact was compiled from")
    p.set_defaults(handler=_bench)
    return parser


def _compile(args) -> int:
    import graft
    from graft.runtime.errors import GraftError

    target = args.target
    if target.startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as err:
            raise GraftError(f"--target {args.target!r} is not valid JSON: {err}") from None
    passes = []
    if args.sparsify:
        from graft import passes as P

        options = {"block": args.sparse_block} if args.sparsify == "bsr" else {}
        passes.append(P.Sparsify(args.sparsify, ratio=args.sparsity,
                                 budget=args.sparsify_budget, **options))
    elif args.sparsity is not None or args.sparsify_budget:
        raise GraftError("--sparsity and --sparsify-budget go with --sparsify")
    if args.quantize:
        from graft import passes as P

        alpha = args.smooth_alpha
        if alpha not in ("auto", "none"):
            try:
                alpha = float(alpha)
            except ValueError:
                raise GraftError(f"--smooth-alpha {alpha!r}: expected a number from 0 to 1, "
                                 "'auto' or 'none'") from None
        passes.append(P.Quantize(args.quantize, group_size=args.group_size,
                                 symmetric=args.symmetric, budget=args.budget,
                                 fallback=args.fallback,
                                 smooth_alpha=None if alpha == "none" else alpha,
                                 activations=args.activations))
    elif args.budget or (args.calibration and not (args.sparsify or args.share_kv
                                                   or args.early_exit or args.speculative
                                                   or args.token_exit)):
        raise GraftError("--budget and --calibration go with a pass that uses them "
                         "(--quantize, or --sparsify, --early-exit, --share-kv, "
                         "--speculative or --token-exit for --calibration)")
    speculative = args.speculative
    if speculative is not None and speculative != "auto":
        if not speculative.isdigit() or int(speculative) < 1:
            raise GraftError(f"--speculative {speculative!r}: expected auto or a layer count")
        speculative = int(speculative)
    if args.early_exit:
        from graft import passes as P

        passes.append(P.EarlyExit(args.early_exit, exits=args.exit_layers,
                                  confidence=args.exit_confidence))
    elif args.exit_layers != "auto":
        raise GraftError("--exit-layers goes with --early-exit")
    if args.share_kv or args.share_kv_groups:
        from graft import passes as P

        passes.append(P.ShareKV(args.share_kv or "perplexity<=1.1",
                                groups=_share_groups(args.share_kv_groups)))
        args.scores = True
    calibration = _calibration(args.calibration) if args.calibration else None
    compiled = graft.compile(args.model, input_specs=args.input or None, target=target,
                             dump_dir=args.dump_dir, max_seq_len=args.max_seq_len,
                             passes=passes, calibration=calibration, scores=args.scores,
                             tune=args.tune, tune_dir=args.tune_dir, kv_cache=args.kv_cache,
                             speculative=speculative, token_exit=args.token_exit)
    path = compiled.save(args.output)
    print(f"wrote {path}")
    for name, sig in compiled.signatures.items():
        print(f"  {name}({_specs(sig['inputs'])}) -> {_specs(sig['outputs'])}")
    kernels = compiled.manifest.get("kernels", {})
    generic = kernels.get("generic_kernels", [])
    if generic:
        print(f"warning: {len(generic)} kernel(s) got only the generic parallel/vectorize "
              f"schedule (expect them to be slow): {', '.join(generic)}", file=sys.stderr)
    return 0


def _specs(specs) -> str:
    from graft.runtime.signature import TensorSpec

    return ", ".join(str(TensorSpec.from_json(s)) for s in specs)


def _share_groups(text: str | None):
    """`20:21,22;24:25` -> [[20, 21, 22], [24, 25]]."""
    from graft.runtime.errors import GraftError

    if not text:
        return None
    groups = []
    for part in text.split(";"):
        owner, _, readers = part.partition(":")
        try:
            groups.append([int(owner)] + [int(r) for r in readers.split(",") if r.strip()])
        except ValueError:
            raise GraftError(f"--share-kv-groups {text!r}: expected OWNER:READER,READER;... "
                             "with layer numbers, e.g. 20:21,22;24:25") from None
        if len(groups[-1]) < 2:
            raise GraftError(f"--share-kv-groups {text!r}: group {part!r} has no reader")
    return groups


def _calibration(path: str) -> list:
    """Calibration samples from an .npz (arrays by input name, samples along axis 0) or a
    directory of .npz files (one sample each)."""
    from pathlib import Path

    import numpy as np

    from graft.runtime.errors import GraftError

    source = Path(path)
    files = sorted(source.glob("*.npz")) if source.is_dir() else [source]
    if not source.exists() or not files:
        raise GraftError(f"calibration data {path!r} does not exist or holds no .npz file")
    samples = []
    for file in files:
        try:
            with np.load(file) as data:
                arrays = [data[k] for k in data.files]
        except Exception as err:  # numpy raises several error types for a bad file
            raise GraftError(f"calibration file {str(file)!r} is not a readable .npz: "
                             f"{err}") from None
        if not arrays:
            raise GraftError(f"calibration file {str(file)!r} holds no arrays")
        if source.is_dir():
            samples.append(tuple(arrays) if len(arrays) > 1 else arrays[0])
        else:
            count = len(arrays[0])
            if any(len(a) != count for a in arrays):
                raise GraftError(f"calibration file {str(file)!r}: the arrays hold different "
                                 "numbers of samples along axis 0")
            samples += [tuple(a[i] for a in arrays) if len(arrays) > 1 else arrays[0][i]
                        for i in range(count)]
    return samples


def _run(args) -> int:
    import numpy as np

    import graft
    from graft.runtime.errors import GraftError

    artifact = graft.load(args.artifact)
    function = artifact.function(args.function) if args.function else artifact.main
    try:
        with np.load(args.inputs) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise GraftError(f"inputs file {args.inputs!r} does not exist") from None
    except Exception as err:
        raise GraftError(f"cannot read inputs file {args.inputs!r} as .npz: {err}") from None
    names = [s.name for s in function.inputs]
    if all(f"arr_{i}" in arrays for i in range(len(arrays))) and not set(arrays) & set(names):
        outputs = function.run(dict(zip(names, (arrays[f"arr_{i}"] for i in range(len(arrays))))))
    else:
        outputs = function.run(arrays)
    if args.output:
        np.savez(args.output, **outputs)
        print(f"wrote {len(outputs)} output{'s' if len(outputs) != 1 else ''} to {args.output}")
    else:
        for name, value in outputs.items():
            print(f"{name}: {'x'.join(map(str, value.shape))} {value.dtype} "
                  f"min {value.min():.6g} max {value.max():.6g} mean {value.mean():.6g}")
    return 0


def _inspect(args) -> int:
    from graft.runtime.artifact import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=1))
        return 0
    v = manifest.get("versions", {})
    print(f"artifact   {args.artifact}  (format {manifest['format_version']})")
    print(f"built by   graft {v.get('graft')}, TVM {v.get('tvm')}, Python {v.get('python')}")
    print(f"target     {json.dumps(manifest.get('target'))}")
    model = manifest.get("model", {})
    print(f"model      {', '.join(f'{k}={val}' for k, val in model.items() if not isinstance(val, (dict, list)))}")
    for name, sig in manifest["functions"].items():
        print(f"function   {name}")
        for spec in sig["inputs"]:
            print(f"  in   {spec['name']}: {'x'.join(map(str, spec['shape'])) or 'scalar'} {spec['dtype']}")
        for spec in sig["outputs"]:
            print(f"  out  {spec['name']}: {'x'.join(map(str, spec['shape'])) or 'scalar'} {spec['dtype']}")
        print(f"  params {len(sig['params'])}")
    passes = manifest.get("passes", [])
    print(f"passes     {', '.join(p['pass'] for p in passes) if passes else '(none)'}")
    print(f"lowering   {', '.join(manifest.get('lowering', []))}")
    for name, entry in manifest["files"].items():
        print(f"file       {name:20s} {entry['bytes']:>12,d} bytes  sha256 {entry['sha256'][:16]}...")
    return 0


def _generate(args) -> int:
    import graft
    from graft.runtime.errors import GraftError

    artifact = graft.load(args.artifact)
    if artifact.manifest.get("model", {}).get("causal_lm", {}).get("kv_cache") == "paged":
        return _generate_paged(artifact, args)
    from graft.runtime.generate import Generator

    if len(args.prompt) > 1 or args.temperature != 0:
        raise GraftError("several prompts and sampling need an artifact compiled with "
                         "--kv-cache paged; this one passes its cache as tensors (greedy, one "
                         "prompt)")
    generator = Generator(artifact)
    speculative = {"auto": None, "on": True, "off": False}[args.speculative]
    result = generator.generate(args.prompt[0], max_new_tokens=args.max_new_tokens,
                                on_token=lambda text: print(text, end="", flush=True),
                                speculative=speculative,
                                token_exit=False if args.token_exit == "off" else None)
    print()
    if args.ids:
        print("ids:", " ".join(map(str, result.token_ids)))
    drafted = ""
    if result.speculative is not None:
        run = result.speculative
        drafted = (f", {run.rounds} draft rounds (acceptance {run.acceptance:.2f}), "
                   f"{run.plain_steps} plain steps")
    if result.token_exit is not None:
        drafted += (f", {result.token_exit.exits} of {result.token_exit.steps} steps exited "
                    f"after layer {result.token_exit.layer}")
    print(f"[{len(result.token_ids)} tokens, prefill {result.prefill_seconds * 1e3:.0f} ms, "
          f"{result.decode_tokens_per_second:.1f} tokens/s{drafted}]", file=sys.stderr)
    return 0


def _generate_paged(artifact, args) -> int:
    from graft.runtime.engine import Engine

    engine = Engine(artifact, max_batch_size=max(len(args.prompt), 1))
    stream = len(args.prompt) == 1
    started = time.perf_counter()
    requests = [engine.submit(prompt, args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed,
                              on_token=(lambda _r, _t, text: print(text, end="", flush=True))
                              if stream else None)
                for prompt in args.prompt]
    engine.run()
    seconds = time.perf_counter() - started
    for request in requests:
        if not stream:
            print(f"--- prompt {request.id}: {args.prompt[request.id]!r}")
            print(request.text, end="")
        print()
        if args.ids:
            print("ids:", " ".join(map(str, request.token_ids)))
    tokens = sum(len(r.token_ids) for r in requests)
    print(f"[{len(requests)} sequence{'s' if len(requests) > 1 else ''}, {tokens} tokens in "
          f"{seconds:.2f} s, {tokens / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def _diff(args) -> int:
    from graft import dump_diff

    return dump_diff.main(args.a, args.b, args.lines)


def _bench(args) -> int:
    import numpy as np

    import graft
    from graft.runtime.errors import GraftError

    dims = {}
    for item in args.dim:
        name, _, size = item.partition("=")
        if not size.isdigit():
            raise GraftError(f"--dim {item!r}: expected NAME=SIZE, e.g. batch=8")
        dims[name] = int(size)
    artifact = graft.load(args.artifact)
    function = artifact.function(args.function) if args.function else artifact.main
    if any(spec.dtype == "object" for spec in function.inputs):
        raise GraftError(f"{function.name} takes a paged KV cache, which random inputs cannot "
                         "stand in for; time generation with graft.runtime.engine.Engine "
                         "(bench/bench_kv.py does)")
    from graft.runtime.signature import random_inputs

    inputs = random_inputs(function.inputs, dims)
    tensors = function.check_inputs(inputs)
    if args.compare:
        _bench_against(args, function, inputs, tensors)
    else:
        function.run_tvm(*tensors)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            function.run_tvm(*tensors)
            times.append(time.perf_counter() - start)
        print(_percentiles(function.name, np.array(times) * 1e3))
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak resident memory {peak_mb:.0f} MB (this process: loading, inputs and runs"
          f"{', and the reference' if args.compare else ''})")
    if args.profile:
        from graft.runtime.profile import profile

        kernels, run_ms = profile(function, tensors, repeat=max(3, args.repeat // 4))
        total = sum(k.total_ms for k in kernels)
        print(f"kernels by time (per run; {total:.3f} ms in kernels of {run_ms:.3f} ms "
              "measured with the profiler on):")
        for k in kernels[:args.top]:
            print(f"  {k.total_ms:9.3f} ms {100 * k.total_ms / max(total, 1e-9):5.1f}%  "
                  f"{k.calls:4d} call{'s' if k.calls != 1 else ' '}  {k.name}")
    return 0


def _percentiles(label: str, ms) -> str:
    import numpy as np

    return (f"{label}: p50 {np.percentile(ms, 50):.3f} ms  p90 {np.percentile(ms, 90):.3f} ms  "
            f"p99 {np.percentile(ms, 99):.3f} ms  {1e3 / np.median(ms):.1f} calls/s  "
            f"({len(ms)} runs)")


def _bench_against(args, function, inputs, tensors) -> None:
    """`graft bench --compare`: the artifact and the reference, interleaved, and the ratio."""
    import numpy as np

    from graft import compare

    run_reference = compare.reference(args.compare, args.model,
                                      [spec.name for spec in function.inputs], inputs)
    ours = function(*inputs)
    difference = compare.largest_difference(list(ours) if isinstance(ours, tuple) else [ours],
                                            run_reference())
    ms = compare.timed_in_blocks({"graft": lambda: function.run_tvm(*tensors),
                                  args.compare: run_reference}, args.repeat)
    width = max(len(function.name), len(args.compare))
    print(f"{function.name} against {args.compare} ({Path(args.model).name}), the same inputs, "
          f"timed in alternating blocks:")
    print("  " + _percentiles(f"{'graft':<{width}}", ms["graft"]))
    print("  " + _percentiles(f"{args.compare:<{width}}", ms[args.compare]))
    ratio = np.median(ms["graft"]) / np.median(ms[args.compare])
    print(f"  graft/{args.compare} {ratio:.2f} (medians); {difference}")


if __name__ == "__main__":
    sys.exit(main())
