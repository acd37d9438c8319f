"""ShareKV: layers read an earlier layer's K/V, so the paged KV cache holds fewer layers.

A group is an owner layer and the readers after it: a reader attends with its own queries over
the owner's keys and values, and its own K/V projections are gone. In graft's causal-LM export
(`frontend/causal_lm.py`) each layer l attends over concat(take(past_k, l), k_l); ShareKV makes a
reader read its owner's concat instead, in every function (the explicit cache still carries all
layers then), and PagedKV lowers such a second read of a layer onto the cache's
`attention_with_shared_kv`, so the cache holds owners only. ShareKV therefore needs
kv_cache="paged".

Choosing the groups, training-free, on calibration text (token id sequences):
1. One build of `score` (logits of every position) in which every layer l > 0 takes, by a
   run-time flag, either its own K/V or the K/V layer l-1 uses (so flags set on a run of layers
   make them all read the layer before the run): every candidate grouping is one more run of
   the same executable, never a recompile.
2. Candidates ranked by how interchangeable a layer's K/V are with the previous layer's
   (cosine similarity of keys and values, per token and head, on the calibration text: what
   MiniCache observes grows with depth).
3. Greedy: in that order, a layer becomes a reader of the group before it if the perplexity
   ratio against the original model on the search samples stays within the budget.
4. The final grouping is measured on held-out samples; over budget there is an error.
The ratio is against the model as ShareKV receives it (after Quantize, the quantized model).
`groups=` skips the search (e.g. [[20, 21, 22], [24, 25]]: layer 20 owns 21 and 22).
"""

from __future__ import annotations

import copy

import numpy as np
import tvm
from tvm import relax

from graft import progress
from graft.ir.attention import cache_reads
from graft.passes.pipeline import CompileState, GraftPass
from graft.passes.quantize.evaluate import Budget, Evaluator
from graft.runtime.errors import GraftError

FLAGS = "graft_share_kv_flags"  # the measuring build's run-time choice, one bool per layer
SWITCHED = "score_share_kv"


class ShareKV(GraftPass):
    """Share K/V between layers within a perplexity budget; see the module text."""

    name = "share_kv"

    def __init__(self, budget: str = "perplexity<=1.1", groups=None, held_out: float = 0.25):
        self.budget = Budget(budget)
        if self.budget.metric != "perplexity":
            raise GraftError(f"ShareKV budgets are perplexity ratios (perplexity<=1.1), got "
                             f"{self.budget}")
        self.groups = [list(map(int, g)) for g in groups] if groups is not None else None
        self.held_out = float(held_out)

    def options(self) -> dict:
        return {"budget": str(self.budget), "groups": self.groups, "held_out": self.held_out}

    def run(self, state: CompileState) -> dict:
        if "score" not in state.signatures:
            raise GraftError("ShareKV measures perplexity with the `score` function (logits of "
                             "every position): compile the language model with scores=True "
                             "(--scores)")
        layers = len(cache_reads(state.mod["score"]))
        if layers < 2:
            raise GraftError(f"ShareKV found {layers} attention layer(s) reading a KV cache; "
                             "it needs a causal LM export with at least two")
        owner_of = self._given(layers) if self.groups is not None else None
        search = None
        if owner_of is None or state.calibration:
            evaluator, held_set = self._evaluator(state, layers)
        if owner_of is None:
            owner_of, search = self._search(evaluator, layers)
        report = _measure(evaluator, owner_of, layers, held_set) if state.calibration else {}
        if report.get("held_out") is not None and not self.budget.holds(report["held_out"]):
            raise GraftError(f"share_kv: the budget {self.budget} held on the search samples "
                             f"but not on the held-out ones ({report['held_out']:.4f}) with "
                             f"{len(owner_of)} layers sharing; give more calibration text, or a "
                             "looser budget")
        mod = state.mod.clone()  # the module passes receive stays as it was
        for name in state.signatures:
            mod[name] = _shared(mod[name], owner_of)
        state.mod = relax.transform.DeadCodeElimination()(mod)
        per_token = _kv_bytes_per_layer_token(state.mod["score"])
        owners = [layer for layer in range(layers) if layer not in owner_of]
        return {
            "budget": str(self.budget),
            "groups": [[o] + [r for r in sorted(owner_of) if owner_of[r] == o] for o in owners
                       if any(owner_of[r] == o for r in owner_of)],
            "cache_layers": len(owners),
            "kv_bytes_per_token_before": per_token * layers,
            "kv_bytes_per_token_after": per_token * len(owners),
            "kv_reduction": round(1 - len(owners) / layers, 4),
            "layers": {f"layer {layer}": {"reads": owner_of.get(layer, layer),
                                          "kv_bytes_per_token": 0 if layer in owner_of
                                          else per_token}
                       for layer in range(layers)},
            **({"perplexity_ratio": report} if report else {}),
            **({"search": search} if search is not None else {}),
        }

    def _given(self, layers: int) -> dict:
        owner_of = {}
        for group in self.groups:
            owner, *readers = group
            for reader in readers:
                if not 0 <= owner < reader < layers or reader in owner_of or \
                        reader in [g[0] for g in self.groups]:
                    raise GraftError(f"ShareKV groups {self.groups}: each group is an owner "
                                     f"layer then later layers (0..{layers - 1}), each reader "
                                     "in one group and not itself an owner")
                owner_of[reader] = owner
        return owner_of

    def _evaluator(self, state: CompileState, layers: int):
        samples = list(state.calibration or [])
        if len(samples) < 2:
            raise GraftError("ShareKV needs calibration text (at least 2 token sequences: one "
                             "to search on, one held out) to choose and check the groups")
        held = max(1, int(round(len(samples) * self.held_out)))
        search, held_out = samples[:-held], samples[-held:]
        measuring = CompileState(state.mod.clone(), dict(state.params),
                                 copy.deepcopy(state.signatures), target=state.target)
        measuring.mod[SWITCHED] = _switchable(state.mod["score"]).with_attr(
            "global_symbol", SWITCHED)
        signature = copy.deepcopy(state.signatures["score"])
        signature.params = list(signature.params) + [FLAGS]
        measuring.signatures[SWITCHED] = signature
        measuring.params[FLAGS] = np.zeros(layers, dtype=bool)
        evaluator = Evaluator(measuring, SWITCHED, {"search": search, "held_out": held_out})
        return evaluator, held_out

    def _search(self, evaluator: Evaluator, layers: int) -> tuple[dict, list]:
        similarity = _adjacent_similarity(evaluator, layers)
        order = sorted(range(1, layers), key=lambda layer: -similarity[layer])
        flags = np.zeros(layers, dtype=bool)
        trials = []
        for i, layer in enumerate(order):
            progress.count(f"choosing layers to share K/V (budget {self.budget})", i, len(order))
            flags[layer] = True
            value = _ratio(evaluator, flags, "search")
            kept = self.budget.holds(value)
            flags[layer] = kept
            trials.append({"layer": layer, "similarity": round(similarity[layer], 4),
                           "perplexity_ratio": round(value, 5), "kept": bool(kept),
                           "readers": int(flags.sum())})
        progress.count(f"choosing layers to share K/V (budget {self.budget})", len(order),
                       len(order))
        return _owners(flags), trials


def _owners(flags: np.ndarray) -> dict:
    """{reader: owner} for flags[l] = "layer l reads the K/V layer l-1 reads"."""
    owner_of, owner = {}, 0
    for layer, shared in enumerate(flags):
        if shared and layer > 0:
            owner_of[layer] = owner
        else:
            owner = layer
    return owner_of


def _flags(owner_of: dict, layers: int) -> np.ndarray:
    """The measuring build's flags for a grouping of runs (owner, owner+1, ...); None when a
    group is not a contiguous run after its owner (only a rebuild could measure that)."""
    flags = np.zeros(layers, dtype=bool)
    for reader in owner_of:
        flags[reader] = True
    return flags if _owners(flags) == owner_of else None


def _ratio(evaluator: Evaluator, flags: np.ndarray, on: str) -> float:
    tensor = tvm.runtime.tensor(flags, evaluator.device)
    return evaluator.measure("perplexity", {FLAGS: (tensor, tensor)}, on)


def _measure(evaluator: Evaluator, owner_of: dict, layers: int, held_set) -> dict:
    flags = _flags(owner_of, layers)
    if flags is None:
        return {"search": None, "held_out": None,
                "note": "groups that are not runs after their owner are not measured"}
    return {"search": round(_ratio(evaluator, flags, "search"), 6),
            "held_out": round(_ratio(evaluator, flags, "held_out"), 6) if held_set else None}


def _adjacent_similarity(evaluator: Evaluator, layers: int) -> list[float]:
    """Per layer l > 0: the mean cosine similarity of its keys and values with layer l-1's,
    per token and KV head, over the search samples (index 0 unused)."""
    sums = np.zeros(layers)
    for _logits, keys, values in evaluator.run({}, "search"):
        for cache in (keys, values):  # [layers, 1, kv_heads, tokens, head_dim]
            x = cache.reshape(layers, -1, cache.shape[-1]).astype(np.float64)
            x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
            sums[1:] += (x[1:] * x[:-1]).sum(-1).mean(-1)
    count = 2 * len(evaluator.samples["search"])
    return list(sums / count)


def _kv_bytes_per_layer_token(func) -> int:
    """K and V bytes of one token in one layer, from past_k [L, 1, kv_heads, P, head_dim]."""
    past_k = func.params[2].ty
    _, _, kv_heads, _, head_dim = past_k.shape.values
    return 2 * int(kv_heads) * int(head_dim) * tvm.DataType(str(past_k.dtype)).bits // 8


@relax.expr_functor.mutator
class _ReadOtherLayers(relax.PyExprMutator):
    """Every use of `replace`'s keys (a layer's K or V concat var) becomes its value's."""

    def __init__(self, replace: dict):
        super().__init__()
        self.replace = replace

    def visit_var_binding_(self, binding: relax.VarBinding):
        if binding.var in self.replace:
            self.set_var_remap(binding.var, self.visit_expr(self.replace[binding.var]))
            return
        super().visit_var_binding_(binding)


def _shared(func: relax.Function, owner_of: dict) -> relax.Function:
    """`func` with each reader's attention (and cache output) on its owner's K/V."""
    reads = {r["layer"]: r for r in cache_reads(func)}
    replace = {}
    for reader, owner in owner_of.items():
        replace[reads[reader]["keys"]] = reads[owner]["keys"]
        replace[reads[reader]["values"]] = reads[owner]["values"]
    mutator = _ReadOtherLayers(replace)
    return relax.Function(func.params, mutator.visit_expr(func.body), None, func.is_pure,
                          func.attrs)


@relax.expr_functor.mutator
class _SwitchLayers(relax.PyExprMutator):
    """Layer l's K and V: where(flags[l], what layer l-1 uses, its own)."""

    def __init__(self, reads: list, flags: relax.Var):
        super().__init__()
        self.flags = flags
        self.kind = {}
        for r in reads:
            self.kind[r["keys"]] = ("keys", r["layer"])
            self.kind[r["values"]] = ("values", r["layer"])
        self.used: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding):
        super().visit_var_binding_(binding)
        if binding.var not in self.kind:
            return
        which, layer = self.kind[binding.var]
        own = self.visit_expr(binding.var)
        if layer > 0 and (which, layer - 1) in self.used:
            flag = self.builder_.emit(relax.op.take(self.flags, relax.const(layer, "int64"),
                                                    axis=0))
            own = self.builder_.emit(relax.op.where(flag, self.used[which, layer - 1], own))
            self.set_var_remap(binding.var, own)
        self.used[which, layer] = own


def _switchable(func: relax.Function) -> relax.Function:
    reads = cache_reads(func)
    flags = relax.Var(FLAGS, relax.TensorType([len(reads)], "bool"))
    body = _SwitchLayers(reads, flags).visit_expr(func.body)
    return relax.Function(list(func.params) + [flags], body, None, func.is_pure, func.attrs)

