"""Quantize: weight-only int8 and int4 for linear layers, within an accuracy budget.

    P.Quantize("int4", group_size=32, budget="perplexity<=1.05")

Every linear layer's weight (read as `matmul(x, permute_dims(W))` or `matmul(x, W)`) is packed
(see `formats`) and read through a dequantize kernel, which the CPU lowering fuses into
matrix-vector products so that decode steps stream the packed bytes (see
`codegen/rewrites/fuse_dequantize.py`). An embedding table tied to a quantized output layer is
read from the same packed weight by a gather kernel.

With calibration data the pass measures itself: it compiles the original function once and
runs it with dequantized weights (see `evaluate`). With a budget, layers whose quantization
alone costs the most accuracy are kept at the fallback precision until the budget holds on the
calibration samples; the figure on the held-out samples is what the manifest records.
"""

from __future__ import annotations

import fnmatch

import numpy as np

from graft import progress
from graft.ir.weights import function_weights, weight_reads
from graft.passes.pipeline import CompileState, GraftPass
from graft.passes.quantize import formats
from graft.passes.quantize.activations import collect_activations, linear_inputs
from graft.passes.quantize.evaluate import METRICS, Budget, Evaluator
from graft.passes.quantize.rewrite import rewrite
from graft.runtime.errors import GraftError

PRECISIONS = ("int4", "int8", "fp16", "fp32")
SENSITIVITY_ROWS = 512  # calibration rows per layer input for ranking layers


class Quantize(GraftPass):
    """Weight-only quantization of linear layers.

    scheme: "int4" (group-wise along the reduction axis), "int8" (per output channel), "fp16"
        (weights stored in half precision, products in float32), or
        "w8a8" (int8 weights per output channel and int8 activations, see `activations`,
        SmoothQuant smoothing; needs calibration data).
    group_size: int4 group size, 32, 64 or 128.
    symmetric: int4 without offsets (w = (q - 8) * scale); default asymmetric, an offset per group.
    budget: "perplexity<=R", "cosine>=C" or "top1>=A", measured on calibration data against
        the original model; layers are kept at `fallback` until it holds.
    fallback: the higher precision for sensitive layers ("int8", "fp16" or "fp32").
    metric: the figure to record when no budget is given (default: perplexity for a causal LM
        compiled with scores=True, next-token agreement (top1) for one without, cosine
        otherwise).
    exclude: glob patterns of weight names to keep in float32.
    held_out: fraction of the calibration samples kept aside for the final figure.
    smooth_alpha: w8a8: SmoothQuant's migration strength, from 0 (the weights' range decides)
        to 1 (the activations' range moves into the weights); "auto" (default) picks, for
        each layer input, the strength whose quantized products stay closest to the float
        ones on the calibration rows; None turns smoothing off.
    activations: w8a8: "static" (one scale per layer input, from calibration) or "dynamic"
        (each token's own scale, computed at run time; smoothing still uses calibration).
    """

    name = "quantize"

    def __init__(self, scheme: str = "int4", *, group_size: int = 32, symmetric: bool = False,
                 budget: str | None = None, fallback: str | None = None,
                 metric: str | None = None, exclude=(), held_out: float = 0.25,
                 smooth_alpha: float | str | None = "auto", activations: str = "static"):
        if scheme not in (*formats.SCHEMES, "w8a8"):
            raise GraftError(f"quantize scheme {scheme!r} is not known: expected one of "
                             f"{', '.join((*formats.SCHEMES, 'w8a8'))}")
        if scheme == "int4" and group_size not in (32, 64, 128):
            raise GraftError(f"int4 group size {group_size} is not supported: expected 32, 64 "
                             "or 128")
        fallback = fallback or {"int4": "int8"}.get(scheme, "fp32")
        if scheme == "w8a8" and fallback != "fp32":
            raise GraftError("w8a8 keeps layers it cannot quantize in fp32: no other fallback")
        if scheme != "w8a8" and (fallback not in PRECISIONS or
                                 PRECISIONS.index(fallback) <= PRECISIONS.index(scheme)):
            raise GraftError(f"fallback precision {fallback!r} must be higher than {scheme!r}: "
                             f"one of {', '.join(PRECISIONS[PRECISIONS.index(scheme) + 1:])}")
        if metric is not None and metric not in METRICS:
            raise GraftError(f"metric {metric!r} is not known: expected one of "
                             f"{', '.join(METRICS)}")
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric
        self.budget = Budget(budget) if budget is not None else None
        self.fallback, self.metric = fallback, metric
        self.exclude, self.held_out = tuple(exclude), held_out
        if not (smooth_alpha is None or smooth_alpha == "auto" or
                (isinstance(smooth_alpha, (int, float)) and 0 <= smooth_alpha <= 1)):
            raise GraftError(f"smooth_alpha {smooth_alpha!r}: expected a number from 0 to 1, "
                             "'auto' or None")
        self.smooth_alpha = smooth_alpha
        if activations not in ("static", "dynamic"):
            raise GraftError(f"activations {activations!r}: expected 'static' (per-tensor "
                             "scales from calibration) or 'dynamic' (per token, at run time)")
        self.activations = activations

    def options(self) -> dict:
        options = {"scheme": self.scheme, "budget": str(self.budget) if self.budget else None,
                   "fallback": self.fallback, "metric": self.metric,
                   "exclude": list(self.exclude)}
        if self.scheme == "int4":
            options.update(group_size=self.group_size, symmetric=self.symmetric)
        if self.scheme == "w8a8":
            options.update(smooth_alpha=self.smooth_alpha, activations=self.activations)
        return options

    def run(self, state: CompileState) -> dict:
        reads = weight_reads(state.mod, state.signatures)
        layers, kept = [], {}
        for name, read in reads.items():
            if not read.is_linear:
                continue
            if any(fnmatch.fnmatch(name, pattern) for pattern in self.exclude):
                kept[name] = "excluded"
                continue
            layers.append(name)
        if not layers:
            raise GraftError("quantize found no linear layer to quantize (weights read as "
                             "matmul(x, permute_dims(W)) or matmul(x, W))")
        if self.scheme == "w8a8":
            return self._run_w8a8(state, layers, reads, kept)
        inputs = self._input_statistics(state, layers) if state.calibration and (
            self.scheme == "int4" or self.budget is not None) else {}
        packed: dict[str, dict[str, formats.PackedWeight]] = {}
        with progress.step(f"quantizing {len(layers)} weights to {self.scheme}"):
            for name in layers:
                packed[name] = self._pack_all(_as_nk(state.params[name], reads[name]),
                                              inputs[name][1] if name in inputs else None)
        precision, why = {}, {}
        for name in layers:
            options = [p for p in (self.scheme, self.fallback) if p in packed[name]]
            precision[name] = options[0] if options else "fp32"
            if precision[name] != self.scheme:
                w_nk = _as_nk(state.params[name], reads[name])
                why[name] = formats.can_pack(self.scheme, *w_nk.shape, self.group_size, w_nk)
            if not options:
                kept[name] = why[name]
        measured = self._measure_and_search(state, reads, packed, precision, inputs)
        errors = {name: _relative_error(packed[name][precision[name]],
                                        _as_nk(state.params[name], reads[name]))
                  for name in layers if precision[name] != "fp32"}
        chosen = {name: packed[name][p] for name, p in precision.items() if p != "fp32"}
        before = sum(state.params[name].nbytes for name in layers)
        rewrite(state, chosen, reads)
        after = sum(p.nbytes for p in chosen.values()) + sum(
            state.params[name].nbytes for name in layers if name not in chosen)
        counts = {p: sum(1 for v in precision.values() if v == p) for p in PRECISIONS}
        return {
            "scheme": self.scheme,
            "precisions": {p: c for p, c in counts.items() if c},
            "weight_bytes": {"before": int(before), "after": int(after)},
            **measured.pop("summary", {}),
            "layers": {name: {"precision": precision[name],
                              **({"weight_error": round(errors[name], 6)}
                                 if name in errors else {}),
                              **({"not_" + self.scheme: why[name]} if name in why else {}),
                              **measured.get(name, {})} for name in layers},
            "kept_float32": kept,
        }

    def _run_w8a8(self, state: CompileState, layers: list, reads: dict, kept: dict) -> dict:
        from graft.passes.quantize.evaluate import compare
        from graft.passes.quantize.w8a8 import quantize_w8a8

        if not state.calibration:
            raise GraftError("quantize w8a8 needs calibration data (calibration= / "
                             "--calibration): activation scales come from it")
        for name in list(layers):
            read = reads[name]
            if read.linear_kn or read.embedding:
                kept[name] = "w8a8 takes weights read as matmul(x, permute_dims(W)) only"
                layers.remove(name)
        samples = list(state.calibration)
        held = max(1, int(round(len(samples) * self.held_out))) if len(samples) > 1 else 0
        search, held_out = samples[:len(samples) - held], samples[len(samples) - held:]
        held_out = held_out or search
        metric = self.budget.metric if self.budget else (self.metric or "cosine")
        function = "main" if "main" in state.signatures else next(iter(state.signatures))
        original = Evaluator(state, function, {"held_out": held_out})
        before = sum(state.params[name].nbytes for name in layers)
        report = quantize_w8a8(state, layers, reads, search, self.smooth_alpha, kept,
                               dynamic=self.activations == "dynamic")
        layers = [name for name in layers if name in report or name in state.params]
        after = sum(state.params[f"{name}.wq"].nbytes for name in report) + sum(
            state.params[name].nbytes for name in layers if name not in report)
        quantized = Evaluator(state, function, {"held_out": held_out}, reference=False)
        value = compare(metric, quantized.outputs({}, "held_out"), original.reference["held_out"],
                        held_out)
        summary = {"metric": metric, "description": METRICS[metric][0],
                   "calibration_samples": len(search), "held_out_samples": len(held_out),
                   "held_out_value": round(value, 6)}
        if self.budget is not None:
            summary["budget"] = str(self.budget)
            if not self.budget.holds(value):
                raise GraftError(f"quantize w8a8 cannot meet the budget {self.budget}: it "
                                 f"reached {metric} {value:.4f} on the held-out samples")
        return {"scheme": "w8a8", "precisions": {"w8a8": len(report),
                                                 **({"fp32": len(layers) - len(report)}
                                                    if len(layers) > len(report) else {})},
                "weight_bytes": {"before": int(before), "after": int(after)}, **summary,
                "layers": {name: report.get(name, {"precision": "fp32"}) for name in layers},
                "kept_float32": kept}

    def _pack_all(self, w_nk: np.ndarray, importance: np.ndarray | None) -> dict:
        """The weight [N, K] packed at every precision it may end up in (int4 weighs its
        rounding error by `importance`, the mean square of each input channel)."""
        n, k = w_nk.shape
        return {scheme: formats.quantize(w_nk, scheme, self.group_size, self.symmetric,
                                         importance if scheme == "int4" else None)
                for scheme in (self.scheme, self.fallback)
                if scheme != "fp32" and formats.can_pack(scheme, n, k, self.group_size,
                                                         w_nk) is None}

    def _input_statistics(self, state: CompileState, layers: list) -> dict:
        """name -> (calibration rows of the layer's input, mean square per input channel),
        from one run of the measured function on the calibration samples it searches on."""
        function = _measured_function(state)
        func = state.mod[function]
        groups: dict = {}
        for x, name, _ in linear_inputs(func, function_weights(func, state.signatures[function]),
                                        set(layers)):
            groups.setdefault(x, []).append(name)
        search_samples, _ = self._split(state.calibration)
        found = collect_activations(state, function, list(groups.items()), search_samples,
                                    rows_kept=SENSITIVITY_ROWS)
        stats: dict = {}
        for names, (_, rows, mean_square) in zip(groups.values(), found):
            for name in names:  # a weight read by several products: their inputs together
                if name in stats:
                    rows, mean_square = np.concatenate([stats[name][0], rows]), \
                        (stats[name][1] + mean_square) / 2
                stats[name] = (rows, mean_square)
        return stats

    def _split(self, calibration) -> tuple[list, list]:
        """The calibration samples the search uses, and those held out for the final figure."""
        samples = list(calibration)
        held = max(1, int(round(len(samples) * self.held_out))) if len(samples) > 1 else 0
        return samples[:len(samples) - held], samples[len(samples) - held:]

    def _measure_and_search(self, state: CompileState, reads: dict, packed: dict,
                            precision: dict, inputs: dict) -> dict:
        """Measure on calibration data; with a budget, raise layers to the fallback precision,
        most sensitive first, until it holds. Changes `precision` in place."""
        if not state.calibration:
            if self.budget is not None:
                raise GraftError(f"quantize budget {self.budget} needs calibration data "
                                 "(calibration= / --calibration) to measure against")
            return {"summary": {"accuracy": "not measured (no calibration data)"}}
        function = _measured_function(state)
        metric = self.budget.metric if self.budget else (self.metric or {
            "score": "perplexity", "prefill": "top1"}.get(function, "cosine"))
        if metric == "perplexity" and function != "score":
            raise GraftError("quantize: perplexity is measured on the `score` function (logits "
                             "of every position): compile the language model with scores=True "
                             "(--scores), or use another metric")
        search_samples, held_out = self._split(state.calibration)
        sets = {"search": search_samples, **({"held_out": held_out} if held_out else {})}
        evaluator = Evaluator(state, function, sets)
        layers = [name for name in precision if precision[name] != "fp32"]
        tensors: dict = {}

        def weights_for(assignment: dict) -> dict:
            out = {}
            for name, p in assignment.items():
                if p == "fp32":
                    continue
                if (name, p) not in tensors:
                    tensors[(name, p)] = evaluator.weight(_as_stored(
                        formats.dequantize(packed[name][p]), reads[name]))
                out[name] = tensors[(name, p)]
            return out

        per_layer: dict[str, dict] = {}
        if self.budget is not None:
            full = evaluator.measure(metric, weights_for(precision), "search")
            if not self.budget.holds(full):
                order = self._sensitivity(state, layers, precision, packed, reads, inputs,
                                          per_layer)
                raise_count = self._search(evaluator, metric, order, precision, weights_for,
                                           full)
                for name in order[:raise_count]:
                    precision[name] = self.fallback
        reached = evaluator.measure(metric, weights_for(precision), "search")
        summary = {"metric": metric, "description": METRICS[metric][0],
                   "calibration_samples": len(search_samples), "calibration_value":
                   round(reached, 6)}
        if held_out:
            value = evaluator.measure(metric, weights_for(precision), "held_out")
            summary.update({"held_out_samples": len(held_out), "held_out_value": round(value, 6)})
        else:
            value = reached
            summary["held_out_samples"] = 0
        if self.budget is not None:
            summary["budget"] = str(self.budget)
            if not self.budget.holds(value):
                raise GraftError(f"quantize: the budget {self.budget} held on the calibration "
                                 f"samples ({reached:.4f}) but not on the held-out ones "
                                 f"({value:.4f}); give more calibration data, or a looser budget")
        return {"summary": summary, **per_layer}

    def _sensitivity(self, state, layers, precision, packed, reads, inputs, per_layer) -> list:
        """Layers by the error their quantization alone adds to their own output on the
        calibration inputs (relative, squared), most first. Local rather than end to end:
        one run of the model instead of one per layer (SmolLM2: 211 layers)."""
        losses = {}
        lows = [name for name in layers if precision[name] == self.scheme and name in inputs]
        for i, name in enumerate(lows):
            progress.count("measuring layer sensitivity", i, len(lows))
            rows = inputs[name][0]
            w = _as_nk(state.params[name], reads[name])
            error = rows @ (formats.dequantize(packed[name][self.scheme]) - w).T
            exact = rows @ w.T
            losses[name] = float(np.square(error, dtype=np.float64).sum() /
                                 max(np.square(exact, dtype=np.float64).sum(), 1e-30))
        progress.count("measuring layer sensitivity", len(lows), len(lows))
        for name, value in losses.items():
            per_layer[name] = {"sensitivity": float(f"{value:.4g}")}
        return sorted(losses, key=lambda n: -losses[n])

    def _search(self, evaluator, metric, order, precision, weights_for, full) -> int:
        """The fewest most-sensitive layers to raise to the fallback so the budget holds
        (binary search: accuracy grows with the number raised)."""
        def value_with(count: int) -> float:
            trial = dict(precision)
            for name in order[:count]:
                trial[name] = self.fallback
            return evaluator.measure(metric, weights_for(trial), "search")

        with progress.step(f"searching the layers to keep at {self.fallback} for "
                           f"{self.budget}"):
            best = value_with(len(order))
            if not self.budget.holds(best):
                raise GraftError(
                    f"quantize cannot meet the budget {self.budget}: all {self.scheme} reached "
                    f"{metric} {full:.4f}, and with every layer at {self.fallback} "
                    f"{best:.4f}")
            low, high = 0, len(order)
            while low < high:
                mid = (low + high) // 2
                if self.budget.holds(value_with(mid)):
                    high = mid
                else:
                    low = mid + 1
        return low


def _measured_function(state: CompileState) -> str:
    """The function accuracy is measured on: `score` (a language model's logits at every
    position), else `main`; a language model without `score` is measured on prefill's last
    logits (next-token agreement)."""
    return next(f for f in ("score", "main", "prefill", *state.signatures)
                if f in state.signatures)


def _as_nk(weight: np.ndarray, read) -> np.ndarray:
    """A linear weight in torch's [N out, K in] layout (it is stored [K, N] when read directly
    as a matmul's right operand)."""
    return weight if read.linear else weight.T


def _as_stored(w_nk: np.ndarray, read) -> np.ndarray:
    return np.ascontiguousarray(w_nk if read.linear else w_nk.T)


def _relative_error(packed: formats.PackedWeight, w_nk: np.ndarray) -> float:
    diff = formats.dequantize(packed) - w_nk
    return float(np.sqrt(np.mean(diff.astype(np.float64) ** 2)) /
                 max(np.sqrt(np.mean(w_nk.astype(np.float64) ** 2)), 1e-30))
