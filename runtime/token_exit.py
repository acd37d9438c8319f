"""Per-token early exit (CALM-style) on the explicit KV cache.

For artifacts compiled with `token_exit=` (functions exit_lower, exit_upper, exit_skip; see
frontend/layer_split.py and passes/early_exit/token_exit.py). The cache is held as two
tensors, the layers below the exit layer k and those from k on (views of prefill's [L, ...]
cache: both are contiguous blocks of it). One step:

    logits_k, hidden, lower = exit_lower(token, position, lower)
    if max softmax(logits_k) >= threshold:  token = argmax(logits_k); upper = exit_skip(hidden, upper)
    else:                                  logits, upper = exit_upper(hidden, upper); token = argmax(logits)

A token that exits leaves in the upper layers' cache the K/V projections of its exiting hidden
state, so every later token still attends to every position in every layer.
"""

from __future__ import annotations

import numpy as np
import tvm

from graft.runtime.errors import ArtifactError

FUNCTIONS = ("exit_lower", "exit_upper", "exit_skip")


def max_probability(logits: np.ndarray) -> float:
    z = logits.astype(np.float64)
    return float(1.0 / np.exp(z - z.max()).sum())


class TokenExitDecoder:
    """Greedy decoding with the artifact's per-token exit; counts steps and exits."""

    def __init__(self, generator, threshold: float | None = None):
        artifact = generator.artifact
        config = generator.config.get("token_exit")
        if config is None or any(f not in artifact.functions for f in FUNCTIONS):
            raise ArtifactError(f"{artifact.path} has no per-token exit: compile it with "
                                "token_exit= (graft compile --token-exit)")
        self.generator = generator
        self.layer = int(config["layer"])
        self.threshold = float(config["threshold"] if threshold is None else threshold)
        self.lower, self.upper, self.skip = (artifact.function(f) for f in FUNCTIONS)
        self.steps = 0
        self.exits = 0

    @property
    def exit_rate(self) -> float:
        return self.exits / self.steps if self.steps else 0.0

    def split(self, past_k, past_v):
        """(lower_k, lower_v, upper_k, upper_v) of a [L, ...] cache: the lower layers are a
        view of it, the upper ones a copy (kernels take no tensors at an offset)."""
        parts = []
        device = self.generator.artifact.device
        for past in (past_k, past_v):
            shape = list(past.shape)
            lower = past._create_view([self.layer] + shape[1:])
            upper = tvm.runtime.tensor(np.ascontiguousarray(past.numpy()[self.layer:]), device)
            parts.append((lower, upper))
        (lower_k, upper_k), (lower_v, upper_v) = parts
        return lower_k, lower_v, upper_k, upper_v

    def step(self, token: int, position: int, cache):
        """(the next token, whether it exited, the cache after this position)."""
        lower_k, lower_v, upper_k, upper_v = cache
        device = self.generator.artifact.device
        ids = tvm.runtime.tensor(np.array([[token]], np.int64), device)
        positions = tvm.runtime.tensor(np.array([[position]], np.int64), device)
        logits, hidden, lower_k, lower_v = self.lower.run_tvm(ids, positions, lower_k, lower_v)
        exit_logits = logits.numpy()[0]
        self.steps += 1
        if max_probability(exit_logits) >= self.threshold:
            self.exits += 1
            upper_k, upper_v = self.skip.run_tvm(hidden, positions, upper_k, upper_v)
            return int(np.argmax(exit_logits)), True, (lower_k, lower_v, upper_k, upper_v)
        logits, upper_k, upper_v = self.upper.run_tvm(hidden, positions, upper_k, upper_v)
        return int(np.argmax(logits.numpy()[0])), False, (lower_k, lower_v, upper_k, upper_v)

    def continue_greedy(self, token: int, position: int, past_k, past_v, emit) -> None:
        """Generate after `token` at `position` until `emit(token)` returns False."""
        cache = self.split(past_k, past_v)
        while True:
            token, _, cache = self.step(token, position, cache)
            position += 1
            if not emit(token):
                return

    def predict(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced over `tokens` from an empty cache: (the greedy next token after each
        position, whether that step exited)."""
        past_k, past_v = self.generator.empty_cache()
        cache = self.split(past_k, past_v)
        predicted, exited = [], []
        for position, token in enumerate(tokens):
            next_token, did_exit, cache = self.step(int(token), position, cache)
            predicted.append(next_token)
            exited.append(did_exit)
        return np.array(predicted), np.array(exited)
