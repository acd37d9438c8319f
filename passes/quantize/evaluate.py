"""Measuring a quantized model against the original, on calibration data.

Weight-only quantization changes nothing but the weights, and `formats.dequantize` computes in
numpy exactly the float32 weights the kernels expand. So the original module is compiled once,
for the one function that is measured, and every candidate precision assignment is evaluated by
running that executable with the assignment's dequantized weights: no recompiling per candidate.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import tvm

from graft import progress
from graft.runtime.errors import GraftError

METRICS = {
    # name: (what it measures, True when higher is better)
    "perplexity": ("perplexity of the quantized model / perplexity of the original", False),
    "cosine": ("mean cosine similarity of output vectors (last axis) to the original's", True),
    "top1": ("fraction of output vectors whose argmax agrees with the original's", True),
}
_BUDGET = re.compile(r"^\s*(perplexity|cosine|top1)\s*(<=|>=)\s*([0-9.eE+-]+)\s*$")


class Budget:
    """An accuracy budget: `perplexity<=1.05`, `cosine>=0.99` or `top1>=0.98`."""

    def __init__(self, text: str):
        match = _BUDGET.match(str(text))
        if not match:
            raise GraftError(f"accuracy budget {text!r} not understood: expected "
                             "'perplexity<=RATIO', 'cosine>=VALUE' or 'top1>=VALUE'")
        self.metric, op, value = match.groups()
        self.bound = float(value)
        higher_better = METRICS[self.metric][1]
        if (op == ">=") != higher_better:
            raise GraftError(f"accuracy budget {text!r}: {self.metric} is bounded "
                             f"{'from below (>=)' if higher_better else 'from above (<=)'}")
        if higher_better and not 0 < self.bound <= 1:
            raise GraftError(f"accuracy budget {text!r}: {self.metric} lies between 0 and 1")
        if not higher_better and self.bound < 1:
            raise GraftError(f"accuracy budget {text!r}: a perplexity ratio below 1 would ask "
                             "the quantized model to beat the original")

    def holds(self, value: float) -> bool:
        higher_better = METRICS[self.metric][1]
        return value >= self.bound if higher_better else value <= self.bound

    def __str__(self) -> str:
        return f"{self.metric}{'>=' if METRICS[self.metric][1] else '<='}{self.bound:g}"


class Evaluator:
    """Runs one function of the original module on calibration samples with chosen weights."""

    def __init__(self, state, function: str, sample_sets: dict[str, list],
                 reference: bool = True):
        from graft.codegen import build as codegen
        from graft.codegen.target import resolve_target
        from graft.passes.pipeline import CompileState, run_pipeline
        from graft.runtime.session import configure_threads

        self.function = function
        signature = copy.deepcopy(state.signatures[function])
        # measured on this host's CPU whatever the target: the rounded weights are the same
        target = resolve_target("cpu")
        kept = {gv: f for gv, f in state.mod.functions_items()
                if gv.name_hint == function or not isinstance(f, tvm.relax.Function)}
        sub = CompileState(tvm.IRModule(kept), dict(state.params), {function: signature},
                           target=target)
        with progress.step(f"compiling {function} for measuring"):
            with progress.quiet():
                run_pipeline(sub, codegen.lowering_entries(target, weight_layouts=False),
                             well_formed_checks=False)
            executable = codegen.build(sub.mod, target)
        self.device = tvm.cpu()
        configure_threads()
        self.vm = tvm.relax.VirtualMachine(executable, self.device)
        self.param_names = list(signature.params)
        self.base = {name: tvm.runtime.tensor(sub.params[name], self.device)
                     for name in self.param_names}
        self.signature = state.signatures[function]
        self.samples = {key: list(samples) for key, samples in sample_sets.items()}
        self.inputs = {key: [[tvm.runtime.tensor(np.ascontiguousarray(a), self.device)
                              for a in _inputs_for(sample, self.signature)] for sample in samples]
                       for key, samples in self.samples.items()}
        self.reference = {}
        if reference:
            with progress.step(f"running the original {function} on calibration data"):
                self.reference = {key: self.outputs({}, key) for key in self.samples}

    def outputs(self, weights: dict, on: str) -> list[np.ndarray]:
        """The first output of the function for every sample, with `weights` ({original name:
        (tensor in the original layout, transposed tensor)}) in place of the original ones."""
        return [outs[0] for outs in self.run(weights, on)]

    def run(self, weights: dict, on: str) -> list[list[np.ndarray]]:
        """Every output of the function for every sample (see `outputs`)."""
        params = []
        for name in self.param_names:
            base = name[:-2] if name.endswith(".T") else name
            if base in weights:
                plain, transposed = weights[base]
                params.append(transposed if name.endswith(".T") else plain)
            else:
                params.append(self.base[name])
        results = []
        for inputs in self.inputs[on]:
            out = self.vm[self.function](*inputs, *params)
            results.append(_flatten(out))
        return results

    def weight(self, array: np.ndarray) -> tuple:
        """Device tensors of a weight in both layouts the compiled function may read."""
        return (tvm.runtime.tensor(array, self.device),
                tvm.runtime.tensor(np.ascontiguousarray(array.T), self.device))

    def measure(self, metric: str, weights: dict, on: str) -> float:
        """The metric of the model with `weights` against the original, on sample set `on`."""
        return compare(metric, self.outputs(weights, on), self.reference[on], self.samples[on])


def compare(metric: str, outputs: list, reference: list, samples: list) -> float:
    """The metric of `outputs` against the original's `reference`, sample by sample."""
    if metric == "perplexity":
        return _perplexity(outputs, samples) / _perplexity(reference, samples)
    if metric == "cosine":
        return float(np.mean([row_cosines(o, r).mean() for o, r in zip(outputs, reference)]))
    return float(np.mean([np.mean(o.argmax(-1) == r.argmax(-1))
                          for o, r in zip(outputs, reference)]))


def _flatten(value) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [array for item in value for array in _flatten(item)]


def _inputs_for(sample, signature) -> list[np.ndarray]:
    """A calibration sample as the function's inputs. For a causal LM's `prefill`, a sample is
    a sequence of token ids: positions count from 0 and the past is empty."""
    specs = signature.inputs
    if isinstance(sample, (list, tuple)) and len(sample) == len(specs) and len(specs) > 1:
        return [np.asarray(a, dtype=s.dtype) for a, s in zip(sample, specs)]
    names = [s.name for s in specs]
    if names[:2] == ["input_ids", "position_ids"]:
        ids = np.asarray(sample, dtype=specs[0].dtype).reshape(1, -1)
        arrays = [ids, np.arange(ids.shape[1], dtype=specs[1].dtype)[None, :]]
        for spec in specs[2:]:  # the past: zero length
            shape = [d if isinstance(d, int) else 0 for d in spec.shape]
            arrays.append(np.zeros(shape, dtype=spec.dtype))
        return arrays
    if len(specs) == 1:
        return [np.asarray(sample[0] if isinstance(sample, (list, tuple)) else sample,
                           dtype=specs[0].dtype)]
    raise GraftError(f"a calibration sample must be a tuple of {len(specs)} inputs "
                     f"({', '.join(names)})")


def _perplexity(logits_list: list, samples: list) -> float:
    total, count = 0.0, 0
    for logits, sample in zip(logits_list, samples):
        ids = np.asarray(sample).reshape(-1)
        z = logits.reshape(-1, logits.shape[-1])[:-1].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(total / max(count, 1))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)
