"""Per-token early exit for decoder LMs (CALM-style), calibrated on text against the full model.

At each decode step the model's own final norm and head are applied to the hidden state that
leaves layer k (`exit_lower`, frontend/layer_split.py). When the largest softmax probability
reaches the threshold, that head's greedy token is the step's token and the layers after k are
not run: `exit_skip` writes their K/V for this position from the exiting hidden state (each
layer's K/V projection of it), so the cache stays whole for the tokens after it. Otherwise
`exit_upper` runs the remaining layers from that hidden state (runtime/token_exit.py).

Calibration, on token id sequences, teacher-forced through the torch model:
1. every candidate layer's head gives, per position, its largest probability and whether its
   greedy token is the full model's (`exit_head_statistics`, shared with speculative.py);
2. per layer, the threshold is the lowest one whose exiting positions disagree with the full
   model on at most MARGIN of what the budget allows (the rest is left for the drift that the
   approximate K/V of skipped layers causes in later tokens, which calibration cannot see);
3. the layer is the one with the best predicted step time by the bytes each path reads:
   layers below k and the exit head always, then either the skipped layers' K/V projections
   (when the token exits) or the layers above k and the head again.
4. a quarter of the calibration text is held out (`split_held_out`); once the model is
   built, the compile runs the compiled decoder teacher-forced over it (`check_held_out`, so
   later tokens see the K/V the exits wrote) against the full model's `score`, and raises the
   threshold (halving 1 - threshold) until the agreement clears the budget there by two
   standard errors (the held-out text is a sample; other text exits differently); the
   figures measured are recorded in the manifest.
"""

from __future__ import annotations

import math

import numpy as np

from graft.passes.quantize.evaluate import Budget
from graft.runtime.errors import GraftError

MARGIN = 0.5
HELD_OUT = 0.25
TIGHTENINGS = 6  # halvings of 1 - threshold before exits are turned off


def exit_head_statistics(model, calibration) -> tuple[np.ndarray, np.ndarray]:
    """(agree, max_prob), each [L - 1, positions]: for the head after layer k (row k - 1),
    whether its greedy token is the full model's, and its largest softmax probability."""
    import torch

    agree, confidence = [], []
    with torch.no_grad():
        for ids in calibration:
            ids = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(1, -1))
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            final = out.logits[0].argmax(-1)
            rows_agree, rows_conf = [], []
            # hidden_states[k] leaves layer k; the last one already went through the norm
            for hidden in out.hidden_states[1:-1]:
                logits = model.lm_head(model.model.norm(hidden[0]))
                rows_agree.append((logits.argmax(-1) == final).numpy())
                rows_conf.append(torch.softmax(logits.double(), -1).max(-1).values.numpy())
            agree.append(np.stack(rows_agree))
            confidence.append(np.stack(rows_conf))
    return np.concatenate(agree, axis=1), np.concatenate(confidence, axis=1)


def threshold_for(agree: np.ndarray, confidence: np.ndarray, allowed: float):
    """(threshold, exit rate, disagreements among exits / positions) for one layer: the
    lowest threshold whose exits disagree on at most `allowed` of the positions."""
    order = np.argsort(-confidence, kind="stable")
    misses = np.cumsum(~agree[order])
    within = np.nonzero(misses <= allowed * len(agree))[0]
    if not len(within):
        return 1.01, 0.0, 0.0  # never exits
    count = int(within[-1]) + 1
    while count < len(order) and confidence[order[count]] == confidence[order[count - 1]]:
        count -= 1  # ties at the boundary would exit too
        if count == 0:
            return 1.01, 0.0, 0.0
    threshold = float(confidence[order[count - 1]])
    exits = confidence >= threshold
    return threshold, float(exits.mean()), float((exits & ~agree).mean())


def step_bytes(model) -> dict:
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    skip = [sum(p.numel() for m in (layer.self_attn.k_proj, layer.self_attn.v_proj,
                                    layer.input_layernorm) for p in m.parameters())
            for layer in model.model.layers]
    head = model.lm_head.weight.numel() + sum(p.numel() for p in model.model.norm.parameters())
    return {"layers": layers, "skip": skip, "head": head}


def predicted_speedup(sizes: dict, layer: int, exit_rate: float) -> float:
    full = sum(sizes["layers"]) + sizes["head"]
    lower = sum(sizes["layers"][:layer]) + sizes["head"]
    upper = sum(sizes["layers"][layer:]) + sizes["head"]
    skip = sum(sizes["skip"][layer:])
    return full / (lower + exit_rate * skip + (1 - exit_rate) * upper)


def calibrate(model, calibration, budget: str = "top1>=0.98", layer: int | None = None) -> dict:
    parsed = Budget(budget)
    if parsed.metric != "top1":
        raise GraftError(f"per-token exit budgets are top-1 agreement with the full model "
                         f"(top1>=0.98), got {budget!r}")
    total = len(model.model.layers)
    if layer is not None and not 1 <= layer < total:
        raise GraftError(f"the exit layer must be 1 to {total - 1} (the model has {total} "
                         f"layers), got {layer}")
    agree, confidence = exit_head_statistics(model, calibration)
    allowed = (1.0 - parsed.bound) * MARGIN
    sizes = step_bytes(model)
    table = []
    for k in ([layer] if layer is not None else range(total // 2, total)):
        threshold, rate, misses = threshold_for(agree[k - 1], confidence[k - 1], allowed)
        table.append({"layer": k, "threshold": round(threshold, 4), "exit_rate": round(rate, 4),
                      "agreement": round(1.0 - misses, 4),
                      "predicted_speedup": round(predicted_speedup(sizes, k, rate), 3)})
    best = max(table, key=lambda row: row["predicted_speedup"])
    return {**best, "budget": str(parsed), "margin": MARGIN, "candidates": table,
            "calibration_tokens": int(agree.shape[1])}


def split_held_out(sequences: list) -> tuple[list, list]:
    """(fit, held out): the last quarter of the sequences, or of the tokens of a single one."""
    if len(sequences) >= 2:
        count = max(1, int(round(len(sequences) * HELD_OUT)))
        return sequences[:-count], sequences[-count:]
    (only,) = sequences
    cut = int(len(only) * (1 - HELD_OUT))
    return [only[:cut]], [only[cut:]]


def check_held_out(generator, held_out: list, budget: str, notify=None) -> dict:
    """Measure the compiled per-token exit on held-out text (teacher-forced, against the full
    model's `score`) and raise its threshold until the agreement meets `budget`; what was
    measured, with the threshold to use."""
    from graft.runtime.token_exit import TokenExitDecoder

    parsed = Budget(budget)
    cfg = generator.config
    empty = np.zeros((cfg["num_layers"], 1, cfg["num_kv_heads"], 0, cfg["head_dim"]),
                     cfg.get("cache_dtype", "float32"))
    score = generator.artifact.function("score")
    full = [score(np.asarray(ids)[None], np.arange(len(ids))[None], empty, empty)[0][0]
            .argmax(-1) for ids in held_out]
    threshold = float(cfg["token_exit"]["threshold"])
    tried = []
    for attempt in range(TIGHTENINGS + 2):
        agree = exits = total = 0
        for ids, reference in zip(held_out, full):
            predicted, exited = TokenExitDecoder(generator, threshold).predict(ids)
            agree += int((predicted == reference).sum())
            exits += int(exited.sum())
            total += len(ids)
        row = {"threshold": round(threshold, 6), "agreement": round(agree / total, 4),
               "exit_rate": round(exits / total, 4)}
        tried.append(row)
        if notify is not None:
            notify(row)
        # the held-out text is a sample: the agreement must clear the budget by two standard
        # errors of a proportion of this many tokens
        required = parsed.bound + 2 * math.sqrt(parsed.bound * (1 - parsed.bound) / total)
        if agree / total >= required or threshold > 1:
            break
        threshold = 1.01 if attempt == TIGHTENINGS else 1 - (1 - threshold) / 2
    return {"threshold": tried[-1]["threshold"], "held_out_agreement": tried[-1]["agreement"],
            "held_out_required": round(required, 4),
            "held_out_exit_rate": tried[-1]["exit_rate"], "held_out_tokens": int(total),
            "held_out_tried": tried}
