"""EarlyExit: a classifier returns from an intermediate layer when an exit head is confident.

Training-free, on calibration inputs (the full model's outputs are the targets; labels are not
needed):
1. Layers are found by `graft.ir.layers` (cuts of the dataflow after each weighted op). One
   run of the model, with every candidate layer's hidden state as an extra output, collects
   them on the calibration samples.
2. Each candidate gets a head fitted in closed form (`heads.fit_head`: ridge regression of the
   model's outputs on pooled features). Its predictions for choosing thresholds are out of
   fold (each search row predicted by a head fitted without it): a head predicts the rows it
   was fitted to too well.
3. Thresholds: exit by exit, on the rows no earlier exit took, the lowest confidence threshold
   whose exiting rows agree with the full model's top-1 at least as often as the budget asks
   (so the whole model meets it on those samples). With `exits="auto"`, exits are added
   greedily while they lower the expected cost (FLOPs run, counting each head and a fixed 1%
   of the model per exit for its kernels), at most `max_exits`.
4. The result is checked on held-out samples, with the compiled control flow; thresholds are
   tightened (the search asks for fewer disagreements) until the held-out agreement meets the
   budget, or there is an error. `thresholds=` fixes them instead (one per named exit; the
   held-out check still applies).

In the module, each exit adds its head, its confidence and `ok = min(confidence over the
batch) >= threshold` to the function, whose result becomes (output, logits_0, ok_0, ...).
The lowering entry `exit_branches` (codegen/rewrites/exit_branches.py) turns that, after the
kernels are fused and scheduled, into nested `R.If`s that return (logits_i, i) as soon as
ok_i holds, so the layers after it are not run. Batch semantics: a batch exits only when every
row is confident (thresholds are calibrated per row); the runtime strips the exit index and
counts exits per function (`Function.exit_counts`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from graft import progress
from graft.codegen.rewrites.exit_branches import EXITS_ATTR
from graft.ir.layers import LayerEnd, layer_ends, total_flops
from graft.ir.weights import bindings, function_weights
from graft.passes.early_exit import heads
from graft.passes.pipeline import CompileState, GraftPass
from graft.passes.quantize.activations import with_taps
from graft.passes.quantize.evaluate import Budget, Evaluator
from graft.runtime.errors import GraftError

EXIT_OVERHEAD = 0.01              # cost of checking one exit, as a fraction of the model
MIN_EXIT_ROWS = 5                 # an exit is kept only if at least this many rows take it
SEARCH_MARGINS = (0.75, 0.5, 0.25, 0.1, 0.0)  # disagreement allowed on the search rows


@dataclass(eq=False)  # compared by identity: each is one candidate
class Exit:
    layer: LayerEnd
    weight: np.ndarray   # [F, C]
    bias: np.ndarray     # [C]
    threshold: float = 2.0  # above any confidence: never taken


class EarlyExit(GraftPass):
    """Exits after intermediate layers of a classifier, within a top-1 agreement budget."""

    name = "early_exit"

    def __init__(self, budget: str = "top1>=0.99", exits="auto", confidence: str = "max_prob",
                 held_out: float = 0.25, max_exits: int = 3, thresholds=None):
        self.budget = Budget(budget)
        if self.budget.metric != "top1":
            raise GraftError(f"EarlyExit budgets are top-1 agreement with the full model "
                             f"(top1>=0.99), got {self.budget}")
        if confidence not in heads.CONFIDENCES:
            raise GraftError(f"early-exit confidence {confidence!r} is not known: expected "
                             f"{' or '.join(heads.CONFIDENCES)}")
        self.exits = _parse_exits(exits)
        self.confidence = confidence
        self.held_out = float(held_out)
        self.max_exits = int(max_exits)
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        if self.thresholds is not None and (self.exits == "auto" or
                                            len(self.thresholds) != len(self.exits)):
            raise GraftError("early-exit thresholds are given per exit: name the exits too "
                             f"(exits={self.exits!r}, thresholds={self.thresholds})")

    def options(self) -> dict:
        return {"budget": str(self.budget), "exits": self.exits, "confidence": self.confidence,
                "held_out": self.held_out, "max_exits": self.max_exits,
                "thresholds": self.thresholds}

    def run(self, state: CompileState) -> dict:
        name, func, weights = self._function(state)
        if not state.calibration or len(state.calibration) < 8:
            raise GraftError("EarlyExit fits its heads and thresholds on calibration inputs: "
                             "give at least 8 samples (calibration=, --calibration)")
        dims = state.flops_dims
        ends, total = layer_ends(func, weights, dims), total_flops(func, dims)
        candidates = self._candidates(ends, total)
        if not candidates:
            raise GraftError(f"early_exit: no exit point found in {name} (layers found: "
                             f"{[e.index for e in ends]}; requested {self.exits})")
        samples = list(state.calibration)
        held = max(1, int(round(len(samples) * self.held_out)))
        sets = {"search": samples[:-held], "held_out": samples[-held:]}
        outputs, taps = _tapped_run(state, name, func, [c.var for c in candidates], sets)
        exits, scored = [], {"search": [], "held_out": []}
        with progress.step(f"fitting {len(candidates)} exit heads"):
            for i, layer in enumerate(candidates):
                feats = {key: heads.features(taps[key][i]) for key in sets}
                weight, bias = heads.fit_head(feats["search"], outputs["search"])
                exits.append(Exit(layer, weight, bias))
                # thresholds are chosen on predictions for rows the head was not fitted to
                unseen = heads.out_of_fold(feats["search"], outputs["search"])
                scored["search"].append(self._score(exits[-1], unseen, outputs["search"]))
                scored["held_out"].append(self._score(
                    exits[-1], feats["held_out"] @ weight.astype(np.float64) + bias,
                    outputs["held_out"]))
        reference = {key: outputs[key].argmax(-1) for key in sets}

        for margin in SEARCH_MARGINS:
            target = 1.0 - (1.0 - self.budget.bound) * margin
            chosen = self._choose(exits, scored["search"], target, total)
            if not chosen:
                continue
            simulated = _simulate(chosen, [scored["held_out"][exits.index(e)] for e in chosen])
            if simulated[0] < self.budget.bound:
                continue
            module, params, signature = _rewrite(state, name, func, chosen, self.confidence)
            measured = _measure_compiled(state, name, module, params, signature, sets,
                                         reference["held_out"], len(chosen))
            if measured["agreement"] >= self.budget.bound:
                state.mod, state.params = module, params
                state.signatures[name] = signature
                return self._report(chosen, measured, total, margin, len(candidates))
            if self.thresholds is not None:  # fixed: tightening the search changes nothing
                raise GraftError(f"early_exit: the thresholds given reach top-1 agreement "
                                 f"{measured['agreement']:.4f} on the held-out calibration "
                                 f"samples; the budget is {self.budget}")
        raise GraftError(f"early_exit: no exit both keeps the budget {self.budget} on the "
                         f"held-out calibration samples ({len(sets['held_out'])} samples) and "
                         f"saves work (candidates after layers "
                         f"{[c.index for c in candidates]}); give more calibration data or a "
                         "looser budget")

    # -- steps ---------------------------------------------------------------------------------

    @staticmethod
    def _function(state: CompileState):
        if len(state.signatures) != 1:
            raise GraftError(f"EarlyExit handles classifiers with one entry point; this module "
                             f"has {', '.join(state.signatures)}")
        name = next(iter(state.signatures))
        func = state.mod[name]
        blocks = func.body.blocks
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            raise GraftError(f"early_exit: {name} must be one dataflow block (as the frontends "
                             f"write it), not {len(blocks)} blocks")
        out = func.body.body.ty
        if isinstance(out, relax.TupleType) and len(out.fields) == 1:
            out = out.fields[0]
        if not (isinstance(out, relax.TensorType) and out.ndim == 2
                and str(out.dtype) == "float32"):
            raise GraftError(f"early_exit: {name} must return one float32 [batch, classes] "
                             f"tensor (a classifier's logits), not {out}")
        return name, func, function_weights(func, state.signatures[name])

    def _candidates(self, ends: list[LayerEnd], total: int) -> list[LayerEnd]:
        if self.exits == "auto":
            return [e for e in ends if 0.1 * total <= e.flops_before <= 0.85 * total]
        picked = []
        for want in self.exits:
            if isinstance(want, float):  # a fraction of the model's FLOPs
                end = min(ends, key=lambda e: abs(e.flops_before / max(total, 1) - want))
            else:
                found = [e for e in ends if e.index == want]
                if not found:
                    raise GraftError(f"early_exit: no exit point after layer {want}; layers "
                                     f"that end in one tensor: {[e.index for e in ends]}")
                end = found[0]
            if end not in picked:
                picked.append(end)
        return sorted(picked, key=lambda e: e.position)

    def _score(self, exit_: Exit, logits: np.ndarray, reference: np.ndarray) -> dict:
        return {"confidence": heads.confidence(logits, self.confidence),
                "agree": logits.argmax(-1) == reference.argmax(-1), "exit": exit_}

    def _choose(self, exits: list[Exit], scored: list[dict], target: float, total: int) -> list:
        """Exits (thresholds set) for the search rows: the given ones, or a greedy choice."""
        order = {id(e): i for i, e in enumerate(exits)}

        def thresholds(subset):
            chosen = sorted(subset, key=lambda e: order[id(e)])
            taken = np.zeros(len(scored[0]["agree"]), dtype=bool)
            for e in chosen:
                s = scored[order[id(e)]]
                e.threshold, exits_here = _threshold(s["confidence"], s["agree"], taken, target)
                taken |= exits_here
            return [e for e in chosen if e.threshold <= 1.0]

        if self.thresholds is not None:  # fixed by the caller
            for e, t in zip(exits, self.thresholds):
                e.threshold = t
            return list(exits)
        if self.exits != "auto":
            return thresholds(exits)
        chosen, best = [], 1.0 + EXIT_OVERHEAD
        while len(chosen) < self.max_exits:
            trials = []
            for e in exits:
                if e in chosen:
                    continue
                subset = thresholds(chosen + [e])
                trials.append((_cost(subset, [scored[order[id(x)]] for x in subset], total), e))
            if not trials:
                break
            cost, e = min(trials, key=lambda t: t[0])
            if cost >= best - EXIT_OVERHEAD:
                break
            chosen, best = chosen + [e], cost
        return thresholds(chosen)

    def _report(self, chosen, measured, total, margin, searched) -> dict:
        layers = {f"layer {e.layer.index}": {
            "exit_rate": measured["rates"][i], "exit_agreement": measured["agreement_per_exit"][i],
            "threshold": round(float(e.threshold), 6)} for i, e in enumerate(chosen)}
        layers["full model"] = {"exit_rate": measured["rates"][-1]}
        return {
            "budget": str(self.budget),
            "confidence": self.confidence,
            "candidates": searched,
            "exits": [{"layer": e.layer.index, "features": int(e.weight.shape[0]),
                       "flops_before": round(e.layer.flops_before / max(total, 1), 4),
                       "threshold": round(float(e.threshold), 6),
                       "rate": measured["rates"][i],
                       "agreement": measured["agreement_per_exit"][i]}
                      for i, e in enumerate(chosen)],
            "full_model_rate": measured["rates"][-1],
            "agreement_held_out": measured["agreement"],
            "expected_flops": round(_expected_flops(chosen, measured["rates"], total), 4),
            "search_margin": margin,
            "layers": layers,
        }


def reduce_depth(model, calibration, remove=0.25, fit_map: bool = True, start=None):
    """Static depth reduction of a transformers decoder LM: see `depth.py` (imports torch)."""
    from graft.passes.early_exit.depth import reduce_depth as reduce

    return reduce(model, calibration, remove=remove, fit_map=fit_map, start=start)


def _parse_exits(exits):
    if exits == "auto" or exits is None:
        return "auto"
    items = exits.split(",") if isinstance(exits, str) else list(exits)
    parsed = []
    for item in items:
        text = str(item).strip()
        try:
            value = float(text) if "." in text else int(text)
        except ValueError:
            raise GraftError(f"early-exit points {exits!r}: expected 'auto', layer numbers "
                             "(3,6) or fractions of the model's FLOPs (0.3,0.6)") from None
        if isinstance(value, float) and not 0 < value < 1:
            raise GraftError(f"early-exit point {text}: a fraction must lie between 0 and 1")
        parsed.append(value)
    return parsed


def _tapped_run(state, name, func, taps, sets):
    """The model's outputs [rows, C] and the hidden states at `taps` on each sample set."""
    tapped = relax.transform.Normalize()(tvm.IRModule({name: with_taps(func, taps)}))
    sub = CompileState(tapped, state.params, state.signatures, target=state.target)
    evaluator = Evaluator(sub, name, sets, reference=False)
    outputs, hidden = {}, {}
    with progress.step(f"collecting hidden states at {len(taps)} layers"):
        for key in sets:
            runs = evaluator.run({}, key)
            outputs[key] = np.concatenate([r[0] for r in runs])
            hidden[key] = [np.concatenate([r[1 + i] for r in runs]) for i in range(len(taps))]
    return outputs, hidden


def _threshold(confidence, agree, taken, target) -> tuple[float, np.ndarray]:
    """The lowest threshold at which the rows not `taken` yet and at least that confident agree
    with the full model at least `target` of the time; (2.0, none) when there is none."""
    free = np.flatnonzero(~taken)
    order = free[np.argsort(-confidence[free], kind="stable")]
    agreeing = np.cumsum(agree[order])
    counts = np.arange(1, len(order) + 1)
    ok = (agreeing >= target * counts) & (counts >= MIN_EXIT_ROWS)
    # rows of equal confidence exit together: only cut between different confidences
    distinct = np.append(confidence[order][1:] < confidence[order][:-1], True)
    ok &= distinct
    if not ok.any():
        return 2.0, np.zeros_like(taken)
    last = int(np.flatnonzero(ok)[-1])
    threshold = float(confidence[order[last]])
    exits_here = np.zeros_like(taken)
    exits_here[order[:last + 1]] = True
    return threshold, exits_here


def _simulate(chosen: list[Exit], scored: list[dict]):
    """(agreement, rate per exit + the full model's) of the exits on scored rows."""
    rows = len(scored[0]["agree"]) if scored else 0
    taken = np.zeros(rows, dtype=bool)
    agree, rates = 0, []
    for e, s in zip(chosen, scored):
        here = ~taken & (s["confidence"] >= e.threshold)
        agree += int(s["agree"][here].sum())
        rates.append(float(here.mean()) if rows else 0.0)
        taken |= here
    rates.append(float((~taken).mean()) if rows else 1.0)
    agree += int((~taken).sum())
    return agree / max(rows, 1), rates


def _cost(chosen: list[Exit], scored: list[dict], total: int) -> float:
    """Expected cost per row, as a fraction of the model's FLOPs, with these exits (each exit
    checked costs its head and EXIT_OVERHEAD)."""
    return _expected_flops(chosen, _simulate(chosen, scored)[1], total, EXIT_OVERHEAD)


def _expected_flops(chosen: list[Exit], rates: list, total: int, overhead: float = 0.0) -> float:
    """Σ rate x (fraction of the model's FLOPs run before leaving), heads included."""
    spent, cost = 0.0, 0.0
    for e, rate in zip(chosen, rates):
        spent += overhead + 2.0 * e.weight.size / max(total, 1)
        cost += rate * (e.layer.flops_before / max(total, 1) + spent)
    return cost + rates[-1] * (1.0 + spent)


def _rewrite(state, name, func, chosen: list[Exit], confidence: str):
    """A copy of the module, params and signature with the exits' heads and tests added."""
    params = dict(state.params)
    signature = copy.deepcopy(state.signatures[name])
    head_vars = []
    for i, e in enumerate(chosen):
        w_name, b_name = f"early_exit.{i}.weight", f"early_exit.{i}.bias"
        params[w_name], params[b_name] = e.weight, e.bias
        head_vars.append((relax.Var(w_name, relax.TensorType(list(e.weight.shape), "float32")),
                          relax.Var(b_name, relax.TensorType(list(e.bias.shape), "float32"))))
        signature.params = list(signature.params) + [w_name, b_name]
    classes = int(chosen[0].weight.shape[1])

    bb = relax.BlockBuilder()
    new_params = list(func.params) + [v for pair in head_vars for v in pair]
    attrs = {str(k): v for k, v in func.attrs.items()} if func.attrs is not None else {}
    with bb.function(name, new_params, attrs=attrs, pure=func.is_pure):
        with bb.dataflow():
            for b in bindings(func):
                bb.emit_normalized(b)
            results = []
            for e, (w, bias) in zip(chosen, head_vars):
                feats = bb.emit(heads.relax_features(e.layer.var, e.layer.shape))
                logits = bb.emit(relax.op.add(relax.op.matmul(feats, w), bias))
                score = bb.emit(heads.relax_confidence(logits, classes, confidence))
                ok = relax.op.greater_equal(relax.op.min(score),
                                            relax.const(float(e.threshold), "float32"))
                results += [bb.emit_output(logits), bb.emit_output(ok)]
        bb.emit_func_output(relax.Tuple([_single_output(func.body.body), *results]))
    new_func = bb.get()[name].with_attr(EXITS_ATTR, len(chosen))
    module = state.mod.clone()
    module[name] = new_func
    signature.early_exit = {"exits": [e.layer.index for e in chosen]}
    return module, params, signature


def _single_output(result: relax.Expr) -> relax.Expr:
    """The function's one output tensor (frontends may return it as a 1-tuple)."""
    if isinstance(result.ty, relax.TupleType):
        return result.fields[0] if isinstance(result, relax.Tuple) else \
            relax.TupleGetItem(result, 0)
    return result


def _measure_compiled(state, name, module, params, signature, sets, reference, n_exits) -> dict:
    """Held-out agreement and exit rates of the compiled control flow."""
    sub = CompileState(module, params, {**state.signatures, name: signature}, target=state.target)
    evaluator = Evaluator(sub, name, {"held_out": sets["held_out"]}, reference=False)
    with progress.step("checking the exits on held-out samples"):
        runs = evaluator.run({}, "held_out")
    counts, agreeing = np.zeros(n_exits + 1), np.zeros(n_exits + 1)
    offset = 0
    for value, index in runs:
        n = len(value)
        agreeing[int(index)] += int((value.argmax(-1) == reference[offset:offset + n]).sum())
        counts[int(index)] += n
        offset += n
    rows = max(offset, 1)
    return {"agreement": round(float(agreeing.sum() / rows), 6),
            "rates": [round(float(c / rows), 4) for c in counts],
            "agreement_per_exit": [round(float(a / c), 4) if c else None
                                   for a, c in zip(agreeing, counts)]}
