"""Early-exit self-speculative greedy decoding on the explicit KV cache, adapting as it goes.

For artifacts compiled with a draft (`graft.compile(..., speculative=...)`; functions `draft`
and `score` beside `prefill` and `decode`). One round, from the cache of the P tokens before
the last generated token `t`:

1. draft n tokens with the first k layers and the model's head (`draft`), on a view of the
   first k layers of the cache (a prefix of the [L, 1, H, P, D] tensor, so no copy);
2. verify `t` and the n drafts in one `score` pass of the full model: logits of n + 1
   positions, and the cache with all of them;
3. keep the drafts up to the first one the full model's greedy token disagrees with, then the
   full model's own token there: 1 to n + 1 tokens, exactly those plain greedy decoding gives;
   the cache is cut back to the kept positions.

Adapting (as DEL does): the decoder measures what a decode step, a draft step and a verify
pass of each width take, and keeps a running acceptance rate (each drafted token it could
check counts). Before each round it picks the n (0 to `max_draft_tokens`) with the most
tokens per second by that model; n = 0 is a plain decode step, so it turns itself off when
drafting does not pay. After PROBE_EVERY plain steps it drafts one token to look again, and
each look that finds it still does not pay doubles the wait (up to MAX_PROBE_EVERY). A
`Generator` keeps its decoder, so what it measured carries over from one prompt to the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import tvm

PROBE_EVERY = 32
MAX_PROBE_EVERY = 1024
ACCEPTANCE_MEMORY = 0.9  # weight of the old estimate per checked draft token
TIME_MEMORY = 0.8


def expected_tokens(acceptance: float, draft_tokens: int) -> float:
    a = min(max(float(acceptance), 0.0), 1.0 - 1e-9)
    return (1.0 - a ** (draft_tokens + 1)) / (1.0 - a)


@dataclass
class SpeculativeStats:
    rounds: int = 0          # draft-and-verify rounds
    plain_steps: int = 0     # plain decode steps (drafting off)
    drafted: int = 0
    checked: int = 0         # drafted tokens the verify pass decided (up to the first rejected)
    accepted: int = 0
    draft_lengths: dict = field(default_factory=dict)  # n -> rounds

    @property
    def acceptance(self) -> float:
        return self.accepted / self.checked if self.checked else 0.0


class SpeculativeDecoder:
    """Greedy continuation for a `Generator` whose artifact has `draft` and `score`."""

    def __init__(self, generator, max_draft_tokens: int | None = None, adapt: bool = True):
        artifact = generator.artifact
        config = generator.config
        choice = config.get("speculative", {})
        self.generator = generator
        self.draft = artifact.function("draft")
        self.score = artifact.function("score")
        self.draft_layers = int(config["draft_layers"])
        self.max_draft_tokens = int(max_draft_tokens or choice.get("max_draft_tokens") or
                                    choice.get("draft_tokens", 4))
        self.fixed_tokens = None if adapt else int(max_draft_tokens or
                                                   choice.get("draft_tokens", 4))
        self.acceptance = float(choice.get("acceptance", 0.5))
        self.draft_cost = float(choice.get("draft_cost", 0.5))
        self.seconds = {}  # "decode", "draft", ("verify", width): running estimates
        self.stats = SpeculativeStats()
        self._since_probe = 0
        self._probe_every = PROBE_EVERY

    # --- the timing model -----------------------------------------------------------------
    def _note(self, key, seconds: float) -> None:
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else \
            TIME_MEMORY * old + (1 - TIME_MEMORY) * seconds

    def _verify_seconds(self, width: int) -> float:
        if ("verify", width) in self.seconds:
            return self.seconds[("verify", width)]
        known = [key[1] for key in self.seconds if isinstance(key, tuple)]
        base = self.seconds["decode"]
        if known:  # scale the nearest measured width by the token count
            nearest = min(known, key=lambda w: abs(w - width))
            return self.seconds[("verify", nearest)] * (1 + 0.1 * (width - 1)) / \
                (1 + 0.1 * (nearest - 1))
        return base * (1 + 0.1 * (width - 1))

    def choose_draft_tokens(self) -> int:
        if self.fixed_tokens is not None:
            return self.fixed_tokens
        if "decode" not in self.seconds:
            return 0  # measure a plain step first
        decode = self.seconds["decode"]
        draft = self.seconds.get("draft", self.draft_cost * decode)
        best, best_rate = 0, 1.0 / decode
        for n in range(1, self.max_draft_tokens + 1):
            rate = expected_tokens(self.acceptance, n) / (n * draft + self._verify_seconds(n + 1))
            if rate > best_rate:
                best, best_rate = n, rate
        if best == 0 and self._since_probe >= self._probe_every:
            return -1  # look again at the acceptance: a round of one draft
        return best

    # --- decoding -------------------------------------------------------------------------
    def continue_greedy(self, token: int, position: int, past_k, past_v, emit,
                        limit: int) -> None:
        """Generate after `token` (at `position`, the cache holding the positions before it)
        until `emit(token)` returns False or `limit` tokens came; `emit` sees each in order."""
        while limit > 0:
            n = self.choose_draft_tokens()
            if n != 0 and abs(n) + 1 > limit:  # drafts past the end would only be dropped
                n = 0 if limit == 1 else (limit - 1) * (1 if n > 0 else -1)
            if n == 0:
                start = time.perf_counter()
                logits, past_k, past_v = self.generator.decode.run_tvm(
                    *self._ids_positions([token], position), past_k, past_v)
                token = int(np.argmax(logits.numpy()[0]))
                self._note("decode", time.perf_counter() - start)
                self.stats.plain_steps += 1
                self._since_probe += 1
                position += 1
                limit -= 1
                if not emit(token):
                    return
                continue
            self._since_probe = 0
            kept, past_k, past_v = self._round(token, position, past_k, past_v, abs(n))
            if n < 0:  # a probe: wait longer before the next one unless drafting now pays
                paid = self.choose_draft_tokens() > 0
                self._probe_every = PROBE_EVERY if paid else \
                    min(2 * self._probe_every, MAX_PROBE_EVERY)
            position += len(kept)
            limit -= len(kept)
            for token in kept:
                if not emit(token):
                    return

    def _round(self, token: int, position: int, past_k, past_v, n: int):
        shape = list(past_k.shape)
        shape[0] = self.draft_layers
        draft_k, draft_v = past_k._create_view(shape), past_v._create_view(shape)
        drafts, last = [], token
        start = time.perf_counter()
        for i in range(n):
            logits, draft_k, draft_v = self.draft.run_tvm(
                *self._ids_positions([last], position + i), draft_k, draft_v)
            last = int(np.argmax(logits.numpy()[0]))
            drafts.append(last)
        middle = time.perf_counter()
        logits, new_k, new_v = self.score.run_tvm(
            *self._ids_positions([token] + drafts, position), past_k, past_v)
        greedy = logits.numpy()[0].argmax(-1)
        accepted = 0
        while accepted < n and drafts[accepted] == int(greedy[accepted]):
            accepted += 1
        kept = drafts[:accepted] + [int(greedy[accepted])]
        if accepted < n:  # cut the cache back to `token` and the accepted drafts
            length = position + 1 + accepted
            device = self.generator.artifact.device
            new_k = tvm.runtime.tensor(np.ascontiguousarray(new_k.numpy()[:, :, :, :length]),
                                       device)
            new_v = tvm.runtime.tensor(np.ascontiguousarray(new_v.numpy()[:, :, :, :length]),
                                       device)
        end = time.perf_counter()
        self._note("draft", (middle - start) / n)
        self._note(("verify", n + 1), end - middle)
        checked = accepted + (1 if accepted < n else 0)
        for i in range(checked):
            self.acceptance = ACCEPTANCE_MEMORY * self.acceptance + \
                (1 - ACCEPTANCE_MEMORY) * (1.0 if i < accepted else 0.0)
        s = self.stats
        s.rounds += 1
        s.drafted += n
        s.checked += checked
        s.accepted += accepted
        s.draft_lengths[n] = s.draft_lengths.get(n, 0) + 1
        return kept, new_k, new_v

    def _ids_positions(self, ids: list[int], position: int):
        device = self.generator.artifact.device
        return (tvm.runtime.tensor(np.array([ids], np.int64), device),
                tvm.runtime.tensor(np.arange(position, position + len(ids),
                                             dtype=np.int64)[None], device))
