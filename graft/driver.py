"""The compile driver: import → passes → lowering → build, and the in-memory artifact."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from graft import progress
from graft.artifact import versions, write_artifact
from graft.codegen import build as codegen
from graft.codegen.target import device_kind, resolve_target, target_json
from graft.frontend.imported import ImportedModel
from graft.passes.paged_kv import PAGE_SIZE, PagedKV
from graft.passes.pipeline import CompileState, DumpInstrument, Entry, GraftPass, run_pipeline
from graft.runtime.errors import GraftError
from graft.runtime.signature import TensorSpec


@dataclass
class CompiledModel:
    """A compiled model in memory; `save(path)` writes the artifact directory."""

    executable: object
    params: dict[str, np.ndarray]
    manifest: dict
    extra_files: dict[str, bytes] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        with progress.step(f"writing artifact {path}"):
            return write_artifact(path, self.executable, self.params, self.manifest,
                                  self.extra_files)

    @property
    def signatures(self) -> dict:
        return self.manifest["functions"]


def compile(model, example_inputs=None, *, dynamic_shapes=None, input_specs=None,  # noqa: A001
            target="cpu", passes=(), calibration=None, dump_dir=None, converters=None,
            task: str | None = None, max_seq_len: int | None = None,
            scores: bool = False, tune: int | None = None, tune_dir=None,
            kv_cache: str = "explicit", speculative=None, token_exit=None) -> CompiledModel:
    """Compile `model` for `target`.

    model: torch.nn.Module (with example_inputs), torch.export.ExportedProgram, a path to a
        .pt2 or .onnx file, an onnx.ModelProto, or a causal language model (a transformers
        model, a Hugging Face directory or a .gguf file) for generation; or what
        `import_model` returned (to compile one import for several targets).
    example_inputs: tuple of tensors/arrays for a torch module; for ONNX, optional input specs
        (`NAME:SHAPE:DTYPE` strings or TensorSpec) overriding the graph's own.
    dynamic_shapes: torch.export style, for a torch module.
    target: "cpu" (this host), "cuda", or a TVM target dict.
    passes: graft passes (GraftPass or TVM passes) applied before lowering, in order.
    calibration: iterable of example input tuples, for passes that need data.
    dump_dir: write NNN_<pass>.py and passes.json after every pass (see DESIGN.md, "Dumps").
    converters: {op name: converter} for operators TVM's importers lack.
    task: "causal-lm" compiles prefill/decode entry points for generation (detected for
        transformers *ForCausalLM models, HF directories and .gguf files).
    scores: causal LMs: also compile `score`, the logits of every position (perplexity; what
        Quantize measures a language model with).
    kv_cache: causal LMs: "explicit" (prefill/decode take and return the cache as tensors;
        `runtime.generate.Generator`) or "paged" (TVM's paged KV cache, owned by the runtime:
        prefill/decode/batch_decode for `runtime.engine.Engine`, several sequences at once;
        see passes/paged_kv.py). CPU only.
    speculative: causal LMs, explicit cache: early-exit self-speculative decoding. "auto"
        measures on `calibration` (token id sequences) how often the model's head after each
        layer predicts its greedy token, and compiles a `draft` function (the first k layers
        and the head) only where that predicts a speedup; an int compiles a draft of that
        many layers regardless. The choice, with the acceptance by layer, is in the manifest
        (model.causal_lm.speculative); runtime/speculative.py decodes with it.
    token_exit: causal LMs, explicit cache: per-token early exit (CALM-style) within a top-1
        agreement budget, "top1>=0.98" (the exit layer chosen on `calibration`) or
        "top1>=0.98@24" (after layer 24): adds exit_lower/exit_upper/exit_skip and records
        the layer and threshold in model.causal_lm.token_exit; runtime/token_exit.py decodes
        with it (passes/early_exit/token_exit.py).
    tune: CPU: MetaSchedule trials per kernel with static shapes (see codegen/tune.py); a
        tuned kernel replaces graft's own only where it measured faster. 0 applies the
        records in `tune_dir` (default $GRAFT_TUNE_DIR or ~/.cache/graft/tuning) without
        searching.
    """
    started = time.perf_counter()
    tvm_target = resolve_target(target)
    if kv_cache == "paged" and tvm_target.kind.name != "llvm":  # before minutes of importing
        raise GraftError(f"kv_cache='paged' builds CPU attention kernels; the target is "
                         f"{tvm_target.kind.name} (use kv_cache='explicit' there)")
    if speculative is not None and kv_cache == "paged":
        raise GraftError("speculative decoding drafts on the explicit cache (kv_cache="
                         "'explicit'); the paged engine does not draft")
    if token_exit is not None and kv_cache == "paged":
        raise GraftError("per-token exit runs on the explicit cache (kv_cache='explicit'); "
                         "the paged engine does not exit early")
    calibration = list(calibration) if calibration is not None else None
    dumper = DumpInstrument(dump_dir) if dump_dir is not None else None
    if isinstance(model, ImportedModel):  # imported once, compiled for several targets
        imported = model
    else:
        imported = import_model(model, example_inputs, dynamic_shapes=dynamic_shapes,
                                input_specs=input_specs, converters=converters, task=task,
                                max_seq_len=max_seq_len, scores=scores,
                                speculative=speculative, token_exit=token_exit,
                                calibration=calibration)
    # passes rewrite parameters and signatures: the imported model itself stays as it was
    state = CompileState(imported.mod, dict(imported.params),
                         {name: copy.deepcopy(sig) for name, sig in imported.signatures.items()},
                         target=tvm_target,
                         calibration=list(calibration) if calibration is not None else None,
                         flops_dims=_example_dims(imported))
    if dumper is not None:
        dumper.after(0, Entry("import", None, {"frontend": imported.source.get("frontend")}),
                     state, time.perf_counter() - started,
                     {"functions": list(imported.signatures), **_decoder_exits(imported)})
    _check_order(passes)
    user_entries = [_as_entry(p) for p in passes]
    if kv_cache != "paged" and any(isinstance(p, GraftPass) and p.name == "share_kv"
                                   for p in passes):
        raise GraftError("ShareKV needs kv_cache='paged' (--kv-cache paged): the paged cache "
                         "is what holds only the owner layers")
    if kv_cache not in ("explicit", "paged"):
        raise GraftError(f"kv_cache must be 'explicit' or 'paged', got {kv_cache!r}")
    source = dict(imported.source)
    if kv_cache == "paged":
        if "causal_lm" not in source:
            raise GraftError("kv_cache='paged' is for causal language models (a .gguf file, "
                             "a Hugging Face directory or *ForCausalLM model)")
        paged = PagedKV()
        user_entries.append(paged.as_entry())  # after the user's passes, which see tensors
        source["causal_lm"] = {**source["causal_lm"], "kv_cache": "paged",
                               "page_size": PAGE_SIZE, "decode_batch": paged.decode_batch}
    lowering = codegen.lowering_entries(tvm_target, tune=tune, tune_dir=tune_dir)
    records = run_pipeline(state, user_entries + lowering, dumper)
    user_records, lowering = records[:len(user_entries)], records[len(user_entries):]
    if kv_cache == "paged":  # the layers the cache holds (fewer than the model's with ShareKV)
        source["causal_lm"]["cache_layers"] = user_records[-1]["did"]["cache_layers"]
    with progress.step(f"generating code for {tvm_target.kind.name}"):
        executable = codegen.build(state.mod, tvm_target)
    used = _used_params(state)
    if dumper is not None:
        dumper.add_kernel_times(_kernel_times(executable, used, state, tvm_target))
    manifest = {
        "versions": versions(),
        "target": target_json(tvm_target),
        "device": device_kind(tvm_target),
        "model": source,
        "functions": {name: sig.to_json() for name, sig in state.signatures.items()},
        "passes": user_records,
        "lowering": [r["pass"] for r in lowering],
        "kernels": _kernel_report(lowering),
        "compile_seconds": round(time.perf_counter() - started, 2),
    }
    compiled = CompiledModel(executable, used, manifest, dict(imported.extra_files))
    if imported.held_out.get("token_exit"):
        _check_token_exit(compiled, imported.held_out["token_exit"], tvm_target)
    return compiled


def _check_token_exit(compiled: CompiledModel, held_out: list, tvm_target) -> None:
    """Run the built per-token exit on the held-out calibration text and tighten its threshold
    until the agreement meets the budget (passes/early_exit/token_exit.py); record it."""
    import tempfile

    from graft.passes.early_exit.token_exit import check_held_out
    from graft.runtime import load
    from graft.runtime.generate import Generator

    lm = compiled.manifest["model"]["causal_lm"] = dict(compiled.manifest["model"]["causal_lm"])
    config = lm["token_exit"]  # shared with the imported model's source: replaced, not changed
    if tvm_target.kind.name != "llvm":
        lm["token_exit"] = {**config, "held_out_agreement": None,
                            "held_out_note": f"not measured: built for {tvm_target.kind.name}, "
                                             "checked on this host's CPU only"}
        return
    count = sum(len(ids) for ids in held_out)
    with progress.step(f"checking the per-token exit on {count} held-out tokens"), \
            tempfile.TemporaryDirectory(prefix="graft-token-exit-") as tmp:
        generator = Generator(load(compiled.save(Path(tmp) / "artifact")))
        measured = check_held_out(generator, held_out, config["budget"], notify=lambda row: (
            progress.note(f"threshold {row['threshold']:.4f}: agreement {row['agreement']:.4f}, "
                          f"{row['exit_rate']:.1%} exit")))
    lm["token_exit"] = {**config, **measured}
    if measured["threshold"] > 1:
        progress.note(f"per-token exit left off: no threshold cleared "
                      f"{measured['held_out_required']:.4f} agreement on the {count} held-out "
                      "tokens (more calibration text gives a tighter check)")


def _decoder_exits(imported: ImportedModel) -> dict:
    """What the decoder exits' calibration found, per layer, for passes.json and the report:
    the head after each layer as a draft (acceptance) and as a per-token exit (exit rate and
    agreement at its threshold)."""
    lm = imported.source.get("causal_lm", {})
    layers: dict = {}
    speculative, token_exit = lm.get("speculative"), lm.get("token_exit")
    if speculative and "acceptance_by_layer" in speculative:
        for k, rate in enumerate(speculative["acceptance_by_layer"], start=1):
            layers.setdefault(f"layer {k}", {})["draft_acceptance"] = rate
    if token_exit:
        for row in token_exit["candidates"]:
            entry = layers.setdefault(f"layer {row['layer']}", {})
            entry.update(exit_rate=row["exit_rate"], exit_agreement=row["agreement"])
    did = {}
    if speculative:
        did["speculative"] = {k: v for k, v in speculative.items()
                              if not k.endswith("_by_layer")}
    if token_exit:
        did["token_exit"] = {k: v for k, v in token_exit.items() if k != "candidates"}
    if layers:
        did["layers"] = layers
    return did


def import_model(model, example_inputs=None, *, dynamic_shapes=None, input_specs=None,
                 converters=None, task=None, max_seq_len=None, scores=False,
                 speculative=None, token_exit=None, calibration=None) -> ImportedModel:
    """Dispatch to the right frontend; see `compile` for what `model` may be."""
    kind = _model_kind(model, task)
    with progress.step(f"importing {_describe(model)} ({kind})"):
        if kind == "onnx":
            from graft.frontend.onnx_frontend import import_onnx

            specs = input_specs if input_specs is not None else (
                example_inputs if _are_specs(example_inputs) else None)
            return import_onnx(model, specs, converters=converters)
        if kind == "causal-lm":
            from graft.frontend.causal_lm import import_causal_lm

            return import_causal_lm(model, max_seq_len=max_seq_len, converters=converters,
                                    scores=scores, speculative=speculative,
                                    token_exit=token_exit, calibration=calibration)
        if speculative is not None or token_exit is not None:
            raise GraftError("speculative decoding and per-token exit are for causal language "
                             "models (a .gguf file, a Hugging Face directory or *ForCausalLM "
                             "model)")
        from graft.frontend import torch_frontend as tf

        if kind == "pt2":
            ep = tf.load_exported_program(model)
        elif kind == "exported_program":
            ep = model
        else:
            if example_inputs is None:
                raise GraftError(f"compiling a {type(model).__name__} needs example_inputs: a "
                                 "tuple of tensors torch.export can trace the model with")
            ep = tf.export_module(model, example_inputs, dynamic_shapes)
        imported = tf.import_exported_program(ep, converters=converters,
                                              dynamic_shapes=dynamic_shapes)
        if example_inputs is not None and not _are_specs(example_inputs):
            imported.example_inputs["main"] = [np.asarray(_to_numpy(x)) for x in (
                example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs])]
        return imported


def _model_kind(model, task) -> str:
    if task not in (None, "causal-lm"):
        raise GraftError(f"unknown task {task!r}: expected 'causal-lm' or none")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return "onnx"
        if suffix == ".pt2":
            return "pt2"
        if suffix == ".gguf" or (path.is_dir() and (path / "config.json").is_file()):
            return "causal-lm"
        if not path.exists():
            raise GraftError(f"model file {str(path)!r} does not exist")
        raise GraftError(f"cannot tell what kind of model {str(path)!r} is: expected a .onnx or "
                         ".pt2 file, a .gguf file or a Hugging Face model directory")
    module_name = type(model).__module__
    if module_name.startswith("onnx"):
        return "onnx"
    if task == "causal-lm" or (type(model).__name__.endswith("ForCausalLM")
                               and module_name.startswith("transformers")):
        return "causal-lm"
    if type(model).__name__ == "ExportedProgram":
        return "exported_program"
    if hasattr(model, "forward") and hasattr(model, "state_dict"):
        return "torch"
    raise GraftError(f"cannot compile a {type(model).__name__}: expected a torch.nn.Module, a "
                     "torch.export.ExportedProgram, an onnx.ModelProto, or a path to a .onnx, "
                     ".pt2 or .gguf file")


def _describe(model) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__


def _are_specs(values) -> bool:
    return isinstance(values, (list, tuple)) and len(values) > 0 and all(
        isinstance(v, (str, TensorSpec)) for v in values)


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _check_order(passes) -> None:
    """Refuse orders of graft passes that cannot work, saying why."""
    names = [p.name for p in passes if isinstance(p, GraftPass)]
    if "quantize" in names and "sparsify" in names[names.index("quantize"):]:
        raise GraftError("passes: Sparsify must come before Quantize (Quantize packs the "
                         "weights that Sparsify prunes, and Sparsify finds no float weights "
                         f"after it); the order given was {', '.join(names)}")
    if "early_exit" in names and any(n in ("quantize", "sparsify")
                                     for n in names[names.index("early_exit"):]):
        raise GraftError("passes: EarlyExit must come after Quantize and Sparsify (its heads "
                         "and thresholds are fitted to the model they will run in, and the "
                         f"exits are not weights to compress); the order given was "
                         f"{', '.join(names)}")


def _as_entry(p) -> Entry:
    if isinstance(p, Entry):
        return p
    if isinstance(p, GraftPass):
        return Entry(p.name, p, p.options())
    if isinstance(p, tvm.transform.Pass):
        return Entry(p.info.name, p, {})
    raise GraftError(f"passes must be graft passes or TVM passes, got {type(p).__name__}")


def _example_dims(imported: ImportedModel) -> dict[str, int]:
    """Sizes of the symbolic dims in the example inputs, for FLOPs estimates."""
    dims = {}
    for name, arrays in imported.example_inputs.items():
        func = imported.mod[name]
        for var, array in zip(func.params, arrays):
            sinfo = var.ty
            if isinstance(sinfo, relax.TensorType) and isinstance(sinfo.shape,
                                                                        relax.ShapeExpr):
                for dim, size in zip(sinfo.shape.values, np.shape(array)):
                    if isinstance(dim, tvm.tirx.Var):
                        dims[dim.name] = int(size)
    return dims


def _kernel_report(lowering_records: list) -> dict:
    """Which schedule rule took how many kernels, which got only the generic fallback, and
    (with --tune) which tuned kernels replaced graft's and the times measured."""
    report = {}
    for record in lowering_records:
        did = record.get("did", {})
        if record["pass"] == "schedule":
            report.update({"rules": did.get("rules", {}),
                           "generic_kernels": did.get("generic_kernels", [])})
        elif record["pass"] == "tune":
            report["tuning"] = did
    return report


def _kernel_times(executable, params: dict, state: CompileState, target, repeat: int = 3) -> dict:
    """For report.html: each function's kernels by time per run, on random inputs (integers 0
    or 1, floats standard normal; symbolic dims at the example inputs' sizes, else 1), where
    this host can run the code; else why not."""
    from graft.codegen.target import host_cpu_target
    from graft.runtime.profile import profile_vm
    from graft.runtime.signature import random_inputs

    mcpu = str(target.attrs.get("mcpu", "")) if target.kind.name == "llvm" else None
    if mcpu is None or mcpu not in ("", host_cpu_target()["mcpu"]):
        why = (f"compiled for {target.kind.name}{f' -mcpu={mcpu}' if mcpu else ''}, which this "
               "host does not run")
        return {name: {"skipped": why} for name in state.signatures}
    device = tvm.cpu(0)
    times = {}
    with progress.step(f"profiling kernels for report.html ({repeat} runs per function)"):
        vm = relax.VirtualMachine(executable, device)
        for name, sig in state.signatures.items():
            if any(spec.dtype == "object" for spec in sig.inputs):
                times[name] = {"skipped": "takes a paged KV cache, which random inputs cannot "
                                          "stand in for"}
                continue
            dims = {d: state.flops_dims.get(d, 1) for spec in sig.inputs for d in spec.shape
                    if not isinstance(d, int)}
            tensors = [tvm.runtime.tensor(value, device)
                       for value in random_inputs(sig.inputs, dims)]
            try:
                kernels, run_ms = profile_vm(vm, name, tensors, [
                    tvm.runtime.tensor(np.ascontiguousarray(params[p]), device)
                    for p in sig.params], repeat)
            except Exception as err:  # noqa: BLE001 - the report says so; the compile stands
                first = str(err).strip().splitlines()
                times[name] = {"skipped": f"profiling failed: {first[0] if first else err!r}"}
                continue
            times[name] = {"run_ms": round(run_ms, 4), "repeat": repeat, "dims": dims,
                           "kernels": [{"name": k.name, "calls": k.calls,
                                        "ms": round(k.total_ms, 4)} for k in kernels]}
    return times


def _used_params(state: CompileState) -> dict[str, np.ndarray]:
    names = {p for sig in state.signatures.values() for p in sig.params}
    return {k: v for k, v in state.params.items() if k in names}
