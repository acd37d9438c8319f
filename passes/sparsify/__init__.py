"""Sparsify: structured pruning of feed-forward channels, within an accuracy budget.

    P.Sparsify("ffn_channels", budget="cosine>=0.95")      # the most channels the budget allows
    P.Sparsify("ffn_channels", ratio=0.5)                  # half of every block's channels

Each feed-forward block's intermediate channels (see `ffn`) are ranked by importance:

- "activation" (default with calibration data; Wanda's |W| * ||X|| taken per channel): the
  root mean square of the channel's activation on calibration data times the norm of its
  column of the down projection, i.e. how much the channel adds to the block's output;
- "magnitude": the norms of the channel's rows of the up projections times that column's.

The least important channels of every block are removed (the same fraction in each block,
rounded to whole vectors of `multiple` channels), so the dense products shrink: no sparse
kernel is needed and every target gets faster. With calibration data the kept columns of the
down projection and its bias are refitted by least squares (ridge) so that the block's output
on the calibration activations stays as close as it can to the original's: a training-free
reconstruction step (`correct=False` turns it off).

With a budget, the pass searches (binary search over the fraction removed) the largest
fraction whose measured accuracy holds on the calibration samples, then checks the held-out
ones, as Quantize does (see `passes/quantize/evaluate.py`). The samples the search uses are
split in two: the first half's activations rank the channels and fit the refit, the second
half measures (a refit measured on the rows it was fitted to looks better than it is). The
original function is compiled once, and a candidate is measured with its removed channels'
columns of the down projection set to zero, which computes exactly what the shrunk block
computes.

Weight patterns prune the linear layers themselves (see `linear`) and store them sparse, read
by kernels that skip the zeros (`graft.codegen.sparse`):

    P.Sparsify("bsr", block="16x1", ratio=0.75)          # 75% of each layer's 16x1 blocks
    P.Sparsify("bsr", block="32x1", budget="cosine>=0.95")
    P.Sparsify("unstructured", ratio=0.5)                 # half of every output's weights
    P.Sparsify("2:4")                                     # N:M, M dividing 16

Importance is |W| ("magnitude") or |W| * ||x|| per input channel ("activation"), or for N:M
SparseGPT's own choice as it corrects ("hessian"); with calibration data the kept weights are
corrected (least squares per BSR block row, SparseGPT's update otherwise). A budget searches
the ratio (N:M has its own, 1 - N/M, and a budget only checks it). On a target without the
kernels (CUDA, CPUs without AVX-512) the pruned weights stay dense, and the manifest says so.
"""

from __future__ import annotations

import fnmatch

import numpy as np

from graft import progress
from graft.passes.pipeline import CompileState, GraftPass
from graft.passes.quantize import _measured_function
from graft.ir.weights import function_weights, weight_reads
from graft.passes.quantize.activations import collect_activations, linear_inputs
from graft.passes.quantize.evaluate import METRICS, Budget, Evaluator
from graft.passes.sparsify import linear as L
from graft.passes.sparsify.rewrite import rewrite as rewrite_sparse
from graft.passes.sparsify.ffn import (FFNBlock, find_ffn_blocks, resize_weights, shapes_of,
                                       take_channels)
from graft.runtime.errors import GraftError

PATTERNS = ("ffn_channels", "bsr", "unstructured", "N:M (2:4, 1:4, 4:8, ...)")
BLOCK_STEPS = 20       # the block ratio is searched in steps of 1 / BLOCK_STEPS
IMPORTANCES = ("activation", "magnitude", "hessian")
CALIBRATION_ROWS = 4096  # activation rows per block kept for the least-squares refit
RIDGE = 1e-3             # ridge strength, relative to the mean diagonal of X^T X


class Sparsify(GraftPass):
    """Pruning within an accuracy budget: feed-forward channels, BSR blocks or N:M.

    pattern: "ffn_channels" (whole channels of every feed-forward block's intermediate
        dimension; the products shrink), "bsr" (blocks of every linear layer's weight),
        "unstructured" (single weights) or "N:M" (such as "2:4": N of every M consecutive
        inputs of every output channel).
    ratio: fraction of each block's channels (of each layer's blocks, for "bsr") to remove;
        with a budget, the largest fraction the budget allows is searched instead (up to
        `max_ratio`). N:M removes 1 - N/M.
    block: "bsr"'s block, outputs x inputs ("16x1", "32x1", "16x4", ...; outputs a
        multiple of 16).
    group: "layer" (blocks or weights compared across the whole layer; bsr's default) or
        "row" (every block row, or output, keeps the same count; unstructured's default).
    exclude: fnmatch patterns of weights to leave dense (weight patterns).
    budget: "cosine>=C", "top1>=A" or "perplexity<=R", measured on calibration data against
        the original model (needs calibration data).
    importance: "activation" (needs calibration data), "magnitude", or for N:M with the
        correction "hessian" (SparseGPT's saliency, the mask chosen as the correction goes);
        default: activation when calibration data is given.
    correct: refit the kept down-projection columns and bias by least squares on calibration
        activations (default: whenever calibration data is given).
    multiple: channels kept per block are a multiple of this (whole vectors for the kernels).
    held_out: fraction of the calibration samples kept aside for the final figure.
    """

    name = "sparsify"

    def __init__(self, pattern: str = "ffn_channels", *, ratio: float | None = None,
                 budget: str | None = None, importance: str | None = None,
                 correct: bool | None = None, multiple: int = 16, max_ratio: float = 0.9,
                 held_out: float = 0.25, block="16x1", group: str | None = None,
                 exclude: tuple = ()):
        self.nm = L.parse_nm(pattern)
        if pattern not in PATTERNS[:3] and self.nm is None:
            raise GraftError(f"sparsify pattern {pattern!r} is not known: expected one of "
                             f"{', '.join(PATTERNS)}")
        group = group or ("row" if pattern == "unstructured" else "layer")
        if group not in ("layer", "row"):
            raise GraftError(f"sparsify group {group!r}: expected 'layer' or 'row'")
        self.block = L.parse_block(block) if pattern == "bsr" else None
        self.group, self.exclude = group, tuple(exclude)
        if self.nm is not None:
            if ratio is not None and abs(ratio - (1 - self.nm[0] / self.nm[1])) > 1e-9:
                raise GraftError(f"sparsify {pattern} removes {1 - self.nm[0] / self.nm[1]:.0%}"
                                 f" of the weights; ratio {ratio} contradicts it")
            ratio = 1 - self.nm[0] / self.nm[1]
        if ratio is None and budget is None:
            raise GraftError("sparsify needs a ratio (the fraction of channels to remove) or "
                             "an accuracy budget to search it under")
        if ratio is not None and not 0 <= ratio < 1:
            raise GraftError(f"sparsify ratio {ratio!r}: expected a fraction from 0 to below 1")
        if importance is not None and importance not in IMPORTANCES:
            raise GraftError(f"sparsify importance {importance!r} is not known: expected one "
                             f"of {', '.join(IMPORTANCES)}")
        if importance == "hessian" and pattern == "ffn_channels":
            raise GraftError("sparsify importance 'hessian' is for N:M patterns")
        if not 0 < max_ratio < 1:
            raise GraftError(f"sparsify max_ratio {max_ratio!r}: expected a fraction below 1")
        self.pattern, self.ratio = pattern, ratio
        self.budget = Budget(budget) if budget is not None else None
        self.importance, self.correct = importance, correct
        self.multiple, self.max_ratio, self.held_out = int(multiple), max_ratio, held_out

    def options(self) -> dict:
        options = {"pattern": self.pattern, "ratio": self.ratio,
                   "budget": str(self.budget) if self.budget else None,
                   "importance": self.importance, "correct": self.correct}
        if self.pattern == "ffn_channels":
            return {**options, "multiple": self.multiple}
        return {**options, **({"block": "x".join(map(str, self.block))} if self.block else {}),
                **({"group": self.group} if self.nm is None else {}),
                "exclude": list(self.exclude)}

    def run(self, state: CompileState) -> dict:
        function = _measured_function(state)
        if self.pattern != "ffn_channels":
            return self._run_weights(state, function)
        blocks = find_ffn_blocks(state.mod[function], state.signatures[function])
        if not blocks:
            raise GraftError(f"sparsify found no feed-forward block in {function!r} (matmul, "
                             "optional bias, activation or gated product, matmul)")
        calibrated, importance, correct, (fit, search, held_out) = self._calibration(state)
        hidden = self._hidden_activations(state, function, blocks, fit) if calibrated else {}
        shapes = shapes_of(state.mod[function], state.signatures[function])
        for block in blocks:
            block.width = shapes[block.down.name][block.down.axis]
        order = {block.name: np.argsort(-self._channel_importance(
            state, block, importance, hidden.get(block.name))) for block in blocks}

        def plan(ratio: float) -> dict:
            """Kept channels (sorted) and refitted down weights of every block at `ratio`."""
            kept = {}
            for block in blocks:
                count = _kept_count(block.width, ratio, self.multiple)
                kept[block.name] = np.sort(order[block.name][:count])
            return kept

        measured: dict = {}
        if self.budget is not None:
            ratio, measured = self._search(state, function, blocks, plan, hidden, correct,
                                           search, held_out)
        else:
            ratio = self.ratio
            if calibrated:
                measured = self._measure(state, function, blocks, plan(ratio), hidden, correct,
                                         search, held_out)
        kept = plan(ratio)
        before = sum(_block_bytes(state, b) for b in blocks)
        new_shapes = {}
        for block in blocks:
            index = kept[block.name]
            down, down_bias = self._down_weights(state, block, index, hidden.get(block.name),
                                                 correct, zeroed=False)
            for slot in block.ups:
                state.params[slot.name] = take_channels(state.params[slot.name], slot.axis,
                                                        index)
            for name in block.up_biases:
                state.params[name] = take_channels(state.params[name], 0, index)
            state.params[block.down.name] = down
            if block.down_bias is not None:
                state.params[block.down_bias] = down_bias
            for name in [s.name for s in block.ups] + block.up_biases + [block.down.name]:
                new_shapes[name] = state.params[name].shape
        resize_weights(state, new_shapes)
        after = sum(_block_bytes(state, b) for b in blocks)
        return {
            "pattern": self.pattern, "importance": importance, "corrected": bool(correct),
            "ratio": round(float(ratio), 4),
            "sparsity": round(1 - sum(len(v) for v in kept.values()) /
                              sum(b.width for b in blocks), 4),
            "weight_bytes": {"before": int(before), "after": int(after)},
            **measured,
            "layers": {b.name: {"channels": b.width, "kept": int(len(kept[b.name])),
                                "sparsity": round(1 - len(kept[b.name]) / b.width, 4),
                                "up": [s.name for s in b.ups]} for b in blocks},
        }

    # --- importance, refit -----------------------------------------------------------------

    def _channel_importance(self, state, block: FFNBlock, importance: str, hidden) -> np.ndarray:
        down = _channels_last(state.params[block.down.name], block.down.axis)  # [N out, width]
        column_norms = np.linalg.norm(down.astype(np.float64), axis=0)
        if importance == "activation":
            return np.sqrt(hidden[1].astype(np.float64)) * column_norms
        up_norms = np.ones(block.width)
        for slot in block.ups:  # the norm of each channel's row (column, stored [K, N])
            up_norms = up_norms * np.linalg.norm(state.params[slot.name].astype(np.float64),
                                                 axis=1 - slot.axis)
        return up_norms ** (1 / len(block.ups)) * column_norms

    def _down_weights(self, state, block: FFNBlock, kept: np.ndarray, hidden, correct: bool,
                      zeroed: bool) -> tuple:
        """The down projection (and its bias) for the kept channels: refitted by least squares
        when `correct`. `zeroed`: in the original shape, removed channels' columns zero (what
        the measurements run); otherwise only the kept columns, in the stored layout."""
        stored = state.params[block.down.name]
        down = _channels_last(stored, block.down.axis).astype(np.float64)  # [N out, width]
        bias = state.params[block.down_bias].astype(np.float64) \
            if block.down_bias is not None else None
        new_down, new_bias = down[:, kept], bias
        if correct and hidden is not None and len(kept) < block.width:
            rows = hidden[0].astype(np.float64)                 # [rows, width]
            target = rows @ down.T                              # the block's original output
            a = rows[:, kept]
            if bias is not None:
                a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
            gram = a.T @ a
            gram[np.diag_indices_from(gram)] += RIDGE * max(np.mean(np.diag(gram)), 1e-12)
            solution = np.linalg.solve(gram, a.T @ target)      # [kept (+1), N out]
            new_down = solution[:len(kept)].T
            if bias is not None:
                new_bias = bias + solution[len(kept)]
        if zeroed:
            full = np.zeros_like(down)
            full[:, kept] = new_down
            new_down = full
        out = np.ascontiguousarray(_from_channels_last(new_down, block.down.axis)
                                   .astype(stored.dtype))
        return out, (new_bias.astype(stored.dtype) if new_bias is not None else None)

    def _hidden_activations(self, state, function, blocks, samples) -> dict:
        """name -> (rows of the block's intermediate activation, mean square per channel)."""
        groups = [(block.hidden, block.name) for block in blocks]
        found = collect_activations(state, function, groups, samples,
                                    rows_kept=CALIBRATION_ROWS)
        return {block.name: (rows, mean_square)
                for block, (_, rows, mean_square) in zip(blocks, found)}

    # --- measuring, search -----------------------------------------------------------------

    def _calibration(self, state) -> tuple:
        """(calibrated, importance, correct, (fit, search, held-out samples)). The masks and
        the refit come from the fit half of the search samples and the search measures on the
        other half: measured on the rows it was fitted to, a refit looks better than it is."""
        calibrated = bool(state.calibration)
        importance = self.importance or ("activation" if calibrated else "magnitude")
        correct = calibrated if self.correct is None else self.correct
        if (importance != "magnitude" or correct or self.budget) and not calibrated:
            raise GraftError("sparsify: activation importance, the correction and an accuracy "
                             "budget need calibration data (calibration= / --calibration)")
        search, held_out = self._split(state.calibration) if calibrated else ([], [])
        fit, search = (search[:len(search) // 2], search[len(search) // 2:]) \
            if len(search) > 1 else (search, search)
        return calibrated, importance, correct, (fit, search, held_out)

    def _split(self, calibration) -> tuple[list, list]:
        samples = list(calibration)
        held = max(1, int(round(len(samples) * self.held_out))) if len(samples) > 1 else 0
        return samples[:len(samples) - held], samples[len(samples) - held:]

    def _metric(self, function: str) -> str:
        if self.budget is not None:
            return self.budget.metric
        return {"score": "perplexity", "prefill": "top1"}.get(function, "cosine")

    def _weights_at(self, state, evaluator, blocks, kept, hidden, correct) -> dict:
        weights = {}
        for block in blocks:
            down, down_bias = self._down_weights(state, block, kept[block.name],
                                                 hidden.get(block.name), correct, zeroed=True)
            weights[block.down.name] = evaluator.weight(down)
            if block.down_bias is not None:
                weights[block.down_bias] = evaluator.weight(down_bias)
        return weights

    def _measure(self, state, function, blocks, kept, hidden, correct, search, held_out):
        metric = self._metric(function)
        sets = {"search": search, **({"held_out": held_out} if held_out else {})}
        evaluator = Evaluator(state, function, sets)
        weights = self._weights_at(state, evaluator, blocks, kept, hidden, correct)
        summary = {"metric": metric, "description": METRICS[metric][0],
                   "calibration_samples": len(search),
                   "calibration_value": round(evaluator.measure(metric, weights, "search"), 6)}
        if held_out:
            summary.update(held_out_samples=len(held_out), held_out_value=round(
                evaluator.measure(metric, weights, "held_out"), 6))
        return summary

    def _search(self, state, function, blocks, plan, hidden, correct, search, held_out):
        """The largest ratio (in steps of whole `multiple`s of the narrowest block) whose
        measured accuracy holds the budget on the calibration samples."""
        metric = self.budget.metric
        sets = {"search": search, **({"held_out": held_out} if held_out else {})}
        evaluator = Evaluator(state, function, sets)
        steps = min(b.width for b in blocks) // self.multiple
        ratios = [i / steps for i in range(int(steps * self.max_ratio) + 1)]
        values: dict[int, float] = {}

        def value_at(i: int) -> float:
            if i not in values:
                weights = self._weights_at(state, evaluator, blocks, plan(ratios[i]), hidden,
                                           correct)
                values[i] = evaluator.measure(metric, weights, "search")
            return values[i]

        with progress.step(f"searching the fraction of channels to remove for {self.budget}"):
            low = _largest_holding(len(ratios), lambda i: self.budget.holds(value_at(i)))
        ratio = ratios[low]
        weights = self._weights_at(state, evaluator, blocks, plan(ratio), hidden, correct)
        reached = value_at(low)
        summary = {"metric": metric, "description": METRICS[metric][0], "budget": str(self.budget),
                   "calibration_samples": len(search), "calibration_value": round(reached, 6),
                   "tried": {f"{ratios[i]:.3f}": round(v, 6) for i, v in sorted(values.items())}}
        value = evaluator.measure(metric, weights, "held_out") if held_out else reached
        summary.update(held_out_samples=len(held_out), held_out_value=round(value, 6))
        if not self.budget.holds(value):
            raise GraftError(f"sparsify: the budget {self.budget} held on the calibration samples "
                             f"({reached:.4f} removing {ratio:.0%} of the channels) but not on "
                             f"the held-out ones ({value:.4f}); give more calibration data, or "
                             "a looser budget")
        return ratio, summary

    # --- weight patterns: bsr, N:M -----------------------------------------------------------

    def _format(self) -> str:
        """The storage format: "bsr", "p16" (N:M) or "unstructured"."""
        return "bsr" if self.block else ("p16" if self.nm else "unstructured")

    def _linear_layers(self, state) -> tuple[dict, dict]:
        """({name: ((N, K), stored as [K, N])} of the linear layers to prune, {name: why
        they stay dense})."""
        kind = self._format()
        layers, skipped = {}, {}
        for name, read in weight_reads(state.mod, state.signatures).items():
            if not read.is_linear:
                continue
            if any(fnmatch.fnmatch(name, pattern) for pattern in self.exclude):
                why = "excluded"
            elif read.embedding:
                why = "also read as an embedding table"
            elif read.linear and read.linear_kn:
                why = "read in two layouts"
            elif read.dtype != "float32":
                why = f"a {read.dtype} weight"
            else:
                shape = read.shape if read.linear else read.shape[::-1]
                why = L.fits(kind, shape, self.block)
                if why is None:
                    layers[name] = (shape, bool(read.linear_kn))
                    continue
            skipped[name] = why
        return layers, skipped

    def _input_statistics(self, state, function: str, layers: dict, samples) -> dict:
        """name -> (||x|| per input channel (RMS), X^T X / rows) of each layer's input."""
        func = state.mod[function]
        weights = function_weights(func, state.signatures[function])
        groups: dict = {}
        for x, name, _ in linear_inputs(func, weights, set(layers)):
            groups.setdefault(x, []).append(name)
        group_list = list(groups.items())
        found = collect_activations(state, function, group_list, samples)
        stats = {}
        for (_, names), (_, rows, mean_square) in zip(group_list, found):
            rows = rows.astype(np.float64)
            gram = rows.T @ rows / max(len(rows), 1)
            for name in names:
                stats[name] = (np.sqrt(mean_square.astype(np.float64)), gram)
        return stats

    def _pruned(self, state, layers: dict, stats: dict, importance: str, correct: bool,
                ratio: float) -> dict:
        """name -> (kept blocks or elements, pruned (corrected) W [N, K]) at `ratio`."""
        out = {}
        for name, (shape, stored_kn) in layers.items():
            stored = state.params[name]
            w = stored.T if stored_kn else stored
            x_norm, gram = stats.get(name, (None, None))
            scores = L.importance(w, x_norm if importance != "magnitude" else None)
            if self.block:
                keep = L.block_mask(scores, self.block, ratio, self.group == "row")
                elements = L.expand_block_mask(keep, self.block)
            elif self.nm is None:
                keep = elements = L.element_mask(scores, ratio, self.group == "row")
            else:
                keep = elements = L.nm_mask(scores, *self.nm)
            if correct and gram is not None and self.block:
                pruned = L.correct_block_rows(w, gram, elements, self.block[0])
            elif correct and gram is not None:
                pruned, keep = L.correct(w, gram, elements, self.nm if importance == "hessian"
                                         else None)
            else:
                pruned = np.where(elements, w, 0).astype(w.dtype)
            out[name] = (keep, np.ascontiguousarray(pruned))
        return out

    def _run_weights(self, state: CompileState, function: str) -> dict:
        from graft.codegen import sparse
        from graft.codegen.cpu.common import num_cores

        layers, skipped = self._linear_layers(state)
        if not layers:
            reasons = "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:5])
            raise GraftError(f"sparsify {self.pattern} found no linear layer it can prune in the "
                             f"model" + (f" ({reasons})" if reasons else ""))
        calibrated, importance, correct, (fit, search, held_out) = self._calibration(state)
        if importance == "hessian" and not (self.nm and correct):
            raise GraftError("sparsify importance 'hessian' (SparseGPT's saliency) chooses N:M "
                             "masks during the correction: it needs an N:M pattern and "
                             "correct=True")
        stats = self._input_statistics(state, function, layers, fit) if calibrated else {}
        pruned_at = lambda ratio: self._pruned(  # noqa: E731
            state, layers, stats, importance, correct, ratio)

        measured: dict = {}
        if calibrated:
            metric = self._metric(function)
            evaluator = Evaluator(state, function, {"search": search,
                                                    **({"held_out": held_out} if held_out
                                                       else {})})

            def value(pruned: dict, on: str) -> float:
                weights = {name: evaluator.weight(w.T if layers[name][1] else w)
                           for name, (_, w) in pruned.items()}
                return evaluator.measure(metric, weights, on)

            if self.budget is not None and self.nm is None:
                ratios = [i / BLOCK_STEPS for i in range(int(self.max_ratio * BLOCK_STEPS) + 1)]
                values: dict = {}

                def holds(i: int) -> bool:
                    if i not in values:
                        values[i] = value(pruned_at(ratios[i]), "search")
                    return self.budget.holds(values[i])

                with progress.step(f"searching the fraction of weights to remove for "
                                   f"{self.budget}"):
                    ratio = ratios[_largest_holding(len(ratios), holds)]
                measured["tried"] = {f"{ratios[i]:.3f}": round(v, 6)
                                     for i, v in sorted(values.items())}
            else:
                ratio = self.ratio
            with progress.step(f"pruning {len(layers)} linear layers ({self.pattern}, "
                               f"{ratio:.0%})"):
                pruned = pruned_at(ratio)
            measured.update(metric=metric, description=METRICS[metric][0],
                            calibration_samples=len(search),
                            calibration_value=round(value(pruned, "search"), 6))
            if self.budget is not None:
                measured["budget"] = str(self.budget)
            if held_out:
                measured.update(held_out_samples=len(held_out),
                                held_out_value=round(value(pruned, "held_out"), 6))
            reached = measured.get("held_out_value", measured["calibration_value"])
            if self.budget is not None and not self.budget.holds(reached):
                raise GraftError(
                    f"sparsify {self.pattern}: the budget {self.budget} does not hold: "
                    f"removing {ratio:.0%} of the weights reached {metric} {reached:.4f} "
                    "(on held-out calibration samples); give a looser budget" +
                    (" or a lower ratio" if self.nm else ""))
        else:
            ratio = self.ratio
            pruned = pruned_at(ratio)

        kernels = sparse.sparse_kernels_available(state.target)
        kind = self._format()
        plan, per_layer = {}, {}
        for name, (keep, w) in pruned.items():
            arrays = L.pack(kind, w, keep, self.block)
            stored_bytes = sum(a.nbytes for a in arrays.values())
            per_layer[name] = {"shape": list(layers[name][0]),
                               "sparsity": round(float(1 - np.count_nonzero(w) / w.size), 4),
                               "bytes": int(w.nbytes), "stored_bytes": int(stored_bytes)}
            if self.block:
                per_layer[name]["blocks_kept"] = int(keep.sum())
            if kernels:
                plan[name] = {"pattern": kind, "shape": w.shape,
                              "block": self.block, "arrays": arrays,
                              "stored_kn": layers[name][1]}
            else:
                state.params[name] = np.ascontiguousarray(w.T if layers[name][1] else w)
        if kernels:
            rewrite_sparse(state, plan, num_cores(state.target))
        before = sum(v["bytes"] for v in per_layer.values())
        after = sum(v["stored_bytes"] for v in per_layer.values()) if kernels else before
        zeros = sum(v["sparsity"] * np.prod(v["shape"]) for v in per_layer.values())
        return {
            "pattern": self.pattern, "importance": importance, "corrected": bool(correct),
            "ratio": round(float(ratio), 4),
            "sparsity": round(float(zeros / sum(np.prod(v["shape"])
                                               for v in per_layer.values())), 4),
            "kernel": f"{kind}_matmul" if kernels else (
                f"dense fallback: no sparse kernel for target {state.target.kind.name} "
                "(the pruned weights are stored dense)"),
            "weight_bytes": {"before": int(before), "after": int(after)},
            **measured,
            "layers": per_layer,
            "kept_dense": skipped,
        }


def _largest_holding(count: int, holds) -> int:
    """The largest i in [0, count) with holds(i), for holds true at 0 and monotone."""
    low, high = 0, count - 1
    while low < high:
        mid = (low + high + 1) // 2
        if holds(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _kept_count(width: int, ratio: float, multiple: int) -> int:
    """Channels kept of `width` when removing `ratio` of them, a multiple of `multiple` (or
    all of them), at least one multiple."""
    if ratio <= 0:
        return width
    keep = int(round(width * (1 - ratio) / multiple)) * multiple
    return int(min(max(keep, min(multiple, width)), width))


def _channels_last(array: np.ndarray, axis: int) -> np.ndarray:
    return array if axis == array.ndim - 1 else np.moveaxis(array, axis, -1)


def _from_channels_last(array: np.ndarray, axis: int) -> np.ndarray:
    return array if axis == array.ndim - 1 else np.moveaxis(array, -1, axis)


def _block_bytes(state, block: FFNBlock) -> int:
    names = [s.name for s in block.ups] + block.up_biases + [block.down.name]
    return sum(state.params[n].nbytes for n in names)
