"""Early-exit self-speculative decoding, calibrated: which draft depth k and draft length n.

The draft is the model's first k layers followed by its own final norm and head (the `draft`
function, frontend/causal_lm.py); the full model verifies the drafted tokens in one `score`
pass, and the runtime (runtime/speculative.py) keeps the longest prefix it agrees with, so the
output is exactly greedy decoding. What it saves depends on two numbers, both measured here on
calibration text with the model itself:

- acceptance a_k: how often the head applied after layer k predicts the full model's greedy
  token (each drafted token is checked against the full model's, so it is this rate that
  decides how many are kept);
- cost: a decode step reads every weight once, so a draft step of k layers costs about the
  bytes it reads, (embedding row + k layers + norm + head) / (all of them), of a full step;
  a verify pass of n + 1 tokens costs about one full step plus VERIFY_PER_TOKEN per token.

One round drafts n tokens and verifies them: it yields (1 - a^(n+1)) / (1 - a) tokens for
n d_k + v_n steps' worth of time. The predicted speedup is the best (k, n); below
MIN_SPEEDUP, speculation is left off. The runtime measures the real times and acceptance and
adapts n as it goes (and turns itself off), so the prediction only has to choose k.
"""

from __future__ import annotations

import numpy as np

MIN_SPEEDUP = 1.05     # predicted, to compile a draft at all
VERIFY_PER_TOKEN = 0.1  # a verify pass of n + 1 tokens: about (1 + 0.1 n) decode steps
MAX_DRAFT_TOKENS = 6


def acceptance_by_layer(model, calibration) -> np.ndarray:
    """a[k - 1] for k = 1 .. L - 1: the share of calibration positions where the head after
    layer k predicts the same next token as the whole model."""
    from graft.passes.early_exit.token_exit import exit_head_statistics

    agree, _ = exit_head_statistics(model, calibration)
    return agree.mean(axis=1)


def draft_cost_by_layer(model) -> np.ndarray:
    """c[k - 1]: the bytes a decode step of the first k layers and the head reads, as a share
    of a full step's (the embedding table counts once, as the tied head, or not at all)."""
    layers = model.model.layers
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    head = model.lm_head.weight.numel() + sum(p.numel() for p in model.model.norm.parameters())
    total = sum(per_layer) + head
    return np.array([(sum(per_layer[:k]) + head) / total for k in range(1, len(layers))])


def expected_tokens(acceptance: float, draft_tokens: int) -> float:
    """Tokens one round yields: the accepted drafts plus the full model's own next token."""
    a = min(max(float(acceptance), 0.0), 1.0 - 1e-9)
    return (1.0 - a ** (draft_tokens + 1)) / (1.0 - a)


def predicted_speedup(acceptance: float, draft_cost: float, draft_tokens: int,
                      verify_per_token: float = VERIFY_PER_TOKEN) -> float:
    round_cost = draft_tokens * draft_cost + 1.0 + verify_per_token * draft_tokens
    return expected_tokens(acceptance, draft_tokens) / round_cost


def choose(acceptance: np.ndarray, cost: np.ndarray, max_draft_tokens: int = MAX_DRAFT_TOKENS,
           draft_layers: int | None = None) -> dict:
    """The (k, n) with the best predicted speedup (k fixed when `draft_layers` is given)."""
    candidates = [draft_layers] if draft_layers is not None else range(1, len(acceptance) + 1)
    best = None
    for k in candidates:
        for n in range(1, max_draft_tokens + 1):
            s = predicted_speedup(acceptance[k - 1], cost[k - 1], n)
            if best is None or s > best[0]:
                best = (s, k, n)
    speedup, k, n = best
    return {"draft_layers": int(k), "draft_tokens": int(n),
            "predicted_speedup": round(float(speedup), 3),
            "acceptance": round(float(acceptance[k - 1]), 4),
            "draft_cost": round(float(cost[k - 1]), 4),
            "enabled": bool(speedup >= MIN_SPEEDUP or draft_layers is not None)}


def calibrate(model, calibration, draft_layers: int | None = None,
              max_draft_tokens: int = MAX_DRAFT_TOKENS) -> dict:
    """What to compile: the choice, with the acceptance and cost of every depth."""
    acceptance = acceptance_by_layer(model, calibration)
    cost = draft_cost_by_layer(model)
    chosen = choose(acceptance, cost, max_draft_tokens, draft_layers)
    chosen["acceptance_by_layer"] = [round(float(a), 4) for a in acceptance]
    chosen["draft_cost_by_layer"] = [round(float(c), 4) for c in cost]
    chosen["calibration_tokens"] = int(sum(len(ids) for ids in calibration))
    return chosen
