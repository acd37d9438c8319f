"""Generation on a paged KV cache: several sequences at once, joining and leaving as they go.

For artifacts compiled with `kv_cache="paged"` (`graft compile --kv-cache paged`, the PagedKV
pass): their `prefill`, `decode` and `batch_decode` take TVM's paged KV cache, which
`create_kv_cache` makes and this engine owns.

    engine = Engine(graft.load("build/smollm2"), max_batch_size=8)
    a = engine.submit([1, 2, 3], max_new_tokens=64)                       # greedy
    b = engine.submit("Once upon", temperature=0.8, top_p=0.9, seed=1,
                      on_token=lambda request, token, text: print(text, end=""))
    engine.run()                     # until every request is done (or engine.step(): one step)
    a.token_ids, b.text, engine.kv_memory()

One `step`: requests waiting for a slot are admitted (at most `max_batch_size` sequences hold
cache pages at once) and their prompts prefilled, one sequence per forward; then every running
sequence decodes one token: `decode` (the one-row build) when only one runs, else
`batch_decode` calls of the artifact's `decode_batch` rows each (rows no sequence fills run on
scratch sequences whose token is dropped again). A finished request gives its pages back at
once, so a waiting one joins at the next step: continuous batching. `fork` starts a sequence
from another's cached tokens, which it shares instead of computing them again
(`Request.prefill_tokens` counts what each request computed).

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), cut to the
smallest set of tokens whose probability reaches `top_p`, drawn with the request's own
`numpy.random.Generator(seed)`, so a seeded request gives the same tokens whatever else runs.

An engine is not thread-safe: use one per thread (each has its own VM and cache).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm

from graft.runtime.errors import ArtifactError, RuntimeInputError
from graft.runtime.generate import TOKENIZER_FILE, ArtifactText

PAGED_FUNCTIONS = ("prefill", "decode", "batch_decode")  # plus create_kv_cache, in the VM
SCRATCH_ID = 1 << 40  # sequence ids of the scratch rows (requests count up from 0)


@dataclass(eq=False)  # a request is itself: compared by identity
class Request:
    """One sequence: its prompt, what it generated, and why it stopped."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset = frozenset()
    on_token: Callable | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens)
    prefill_tokens: int = 0  # prompt tokens this request computed (a fork shares the rest)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # engine state
    _cached: list = field(default_factory=list, repr=False)  # tokens whose K/V are cached
    _pending: list = field(default_factory=list, repr=False)  # tokens the next forward feeds
    _rng: np.random.Generator | None = field(default=None, repr=False)
    _fork: tuple | None = field(default=None, repr=False)  # (parent id, tokens shared)
    _shown: str = field(default="", repr=False)


class Engine(ArtifactText):
    """Continuous-batching generation with a paged KV cache; see the module text."""

    def __init__(self, artifact, max_batch_size: int = 8, max_seq_len: int | None = None,
                 tokenizer=None):
        missing = [f for f in PAGED_FUNCTIONS if f not in artifact.functions]
        config = artifact.manifest.get("model", {}).get("causal_lm")
        if config is None or missing or config.get("kv_cache") != "paged":
            raise ArtifactError(f"{artifact.path} has no paged KV cache functions; compile the "
                                "causal LM with --kv-cache paged (or use graft.runtime.generate."
                                "Generator for the explicit cache)")
        if max_batch_size < 1:
            raise RuntimeInputError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.artifact = artifact
        self.config = config
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len or config["max_seq_len"])
        if self.max_seq_len > int(config["max_seq_len"]):
            raise RuntimeInputError(f"max_seq_len {self.max_seq_len} exceeds the artifact's "
                                    f"{config['max_seq_len']}")
        self.vocab_size = int(config["vocab_size"])
        self.eos_token_ids = frozenset(int(t) for t in config.get("eos_token_ids", []))
        self.page_size = int(config.get("page_size", 16))
        self._tokenizer = tokenizer
        self._vm = artifact.vm()
        self._params = {name: artifact.function(name)._params
                        for name in ("prefill", "decode", "batch_decode")}
        self._builtin = {name: tvm.get_global_func(f"vm.builtin.{name}") for name in (
            "kv_state_add_sequence", "kv_state_remove_sequence", "kv_state_fork_sequence",
            "kv_state_popn",
            "kv_state_begin_forward", "kv_state_end_forward",
            "attention_kv_cache_get_num_available_pages")}
        shape = tvm.runtime.ShapeTuple
        self.decode_batch = int(config.get("decode_batch", 8))
        self.max_total_tokens = self.max_batch_size * self.max_seq_len
        scratch = self.decode_batch - 1  # sequences that fill batch_decode's unused rows
        self.cache = self._vm["create_kv_cache"](
            shape([self.max_batch_size + scratch]), shape([self.max_total_tokens + scratch]),
            shape([self.max_seq_len]), shape([self.page_size]), shape([0]))
        self._scratch = [SCRATCH_ID + i for i in range(scratch)]
        for seq in self._scratch:
            self._builtin["kv_state_add_sequence"](self.cache, seq)
        self.pages_total = int(self._builtin["attention_kv_cache_get_num_available_pages"](
            self.cache))
        self._ids = itertools.count()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}  # waiting and running, by id
        self.prefill_tokens = 0  # tokens computed by prefill, over the engine's life
        self.decode_steps = 0

    # --- requests -----------------------------------------------------------------------
    def submit(self, prompt, max_new_tokens: int = 32, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop_token_ids=(),
               on_token: Callable | None = None) -> Request:
        """Queue a prompt (text or token ids); it starts at the next `step`.
        on_token(request, token_id, text) sees every token as it is generated (text is the new
        piece of decoded text, "" without a tokenizer)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RuntimeInputError("the prompt is empty")
        self._check_ids(ids)
        request = self._new_request(ids, max_new_tokens, temperature, top_p, seed,
                                    stop_token_ids, on_token)
        request._pending = list(ids)
        self.waiting.append(request)
        return request

    def fork(self, parent: Request, prompt=(), max_new_tokens: int = 32, **sampling) -> Request:
        """A new request that continues `parent`'s cached tokens (its prompt and what it has
        generated so far) with `prompt`; the shared tokens are not computed again."""
        if parent not in self.running and parent not in self.waiting:
            raise RuntimeInputError(f"request {parent.id} holds no cache to fork (it finished "
                                    "or was never submitted)")
        if parent in self.waiting:
            raise RuntimeInputError(f"request {parent.id} has not been prefilled yet; fork it "
                                    "after a step")
        extra = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._check_ids(extra)
        shared = list(parent._cached)
        ids = shared + list(parent._pending) + extra
        # the last token is fed again so the fork has logits to start from
        keep = len(shared) if (parent._pending or extra) else len(shared) - 1
        request = self._new_request(ids, max_new_tokens, sampling.get("temperature", 0.0),
                                    sampling.get("top_p", 1.0), sampling.get("seed"),
                                    sampling.get("stop_token_ids", ()),
                                    sampling.get("on_token"))
        request._cached = ids[:keep]
        request._pending = ids[keep:]
        request._fork = (parent.id, keep)
        self.waiting.append(request)
        return request

    def _new_request(self, ids, max_new_tokens, temperature, top_p, seed, stop_token_ids,
                     on_token) -> Request:
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise RuntimeInputError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len {self.max_seq_len}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise RuntimeInputError(f"temperature must be >= 0 and top_p in (0, 1]; got "
                                    f"temperature={temperature}, top_p={top_p}")
        request = Request(next(self._ids), list(ids), int(max_new_tokens), float(temperature),
                          float(top_p), seed,
                          frozenset(self.eos_token_ids | {int(t) for t in stop_token_ids}),
                          on_token)
        request._rng = np.random.default_rng(seed)
        self.requests[request.id] = request
        return request

    def _check_ids(self, ids) -> None:
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RuntimeInputError(f"token id {ids[bad]} at prompt position {bad} is outside "
                                    f"the vocabulary (ids 0..{self.vocab_size - 1})")

    # --- scheduling -----------------------------------------------------------------------
    def step(self) -> None:
        """Admit and prefill waiting requests while there are free slots, then decode one
        token for every running sequence."""
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting.pop(0)
            self._admit(request)
            self._prefill(request)
        decoding = [r for r in self.running if not r.finished]
        if decoding:
            self._decode(decoding)
        self._release_finished()

    def run(self) -> list[Request]:
        """Step until every request is done; those that finished in this call, in submission
        order."""
        pending = [r for r in self.requests.values() if not r.finished]
        while self.waiting or self.running:
            self.step()
        return pending

    def generate(self, prompts, max_new_tokens: int = 32, **sampling) -> list[Request]:
        """Submit every prompt, run them together, return their requests in order."""
        requests = [self.submit(p, max_new_tokens, **sampling) for p in prompts]
        self.run()
        return requests

    def _admit(self, request: Request) -> None:
        if request._fork is not None:
            parent, keep = request._fork
            self._builtin["kv_state_fork_sequence"](self.cache, parent, request.id, keep)
        else:
            self._builtin["kv_state_add_sequence"](self.cache, request.id)
        self.running.append(request)

    def _forward(self, function: str, requests: list[Request], tokens: list[list[int]],
                 scratch: int = 0):
        """One forward of `tokens` (per request; `scratch` more one-token rows on scratch
        sequences, undone afterwards); the logits of the requests' rows."""
        seqs = [r.id for r in requests] + self._scratch[:scratch]
        lengths = [len(t) for t in tokens] + [1] * scratch
        ids = np.array([list(itertools.chain(*tokens)) + [0] * scratch], dtype=np.int64)
        positions = np.array([list(itertools.chain(*(
            range(len(r._cached), len(r._cached) + len(t)) for r, t in zip(requests, tokens))))
            + [0] * scratch], dtype=np.int64)
        device = self.artifact.device
        shape = tvm.runtime.ShapeTuple
        self._builtin["kv_state_begin_forward"](self.cache, shape(seqs), shape(lengths))
        try:
            out = self._vm[function](tvm.runtime.tensor(ids, device),
                                     tvm.runtime.tensor(positions, device), self.cache,
                                     *self._params[function])
        finally:
            self._builtin["kv_state_end_forward"](self.cache)
            for seq in self._scratch[:scratch]:
                self._builtin["kv_state_popn"](self.cache, seq, 1)
        for request, fed in zip(requests, tokens):
            request._cached.extend(fed)
        return out[0].numpy()[:len(requests)]

    def _prefill(self, request: Request) -> None:
        start = time.perf_counter()
        pending, request._pending = request._pending, []
        logits = None
        for begin in range(0, len(pending), self.max_seq_len):  # chunks the cache accepts
            chunk = pending[begin:begin + self.max_seq_len]
            logits = self._forward("prefill", [request], [chunk])
            request.prefill_tokens += len(chunk)
            self.prefill_tokens += len(chunk)
        request.prefill_seconds += time.perf_counter() - start
        self._emit(request, logits[0])

    def _decode(self, requests: list[Request]) -> None:
        start = time.perf_counter()
        if len(requests) == 1:
            groups, function = [requests], "decode"
        else:
            width = self.decode_batch
            groups = [requests[i:i + width] for i in range(0, len(requests), width)]
            function = "batch_decode"
        rows = []
        for group in groups:
            tokens = [r._pending for r in group]
            for request in group:
                request._pending = []
            scratch = self.decode_batch - len(group) if function == "batch_decode" else 0
            rows.extend(self._forward(function, group, tokens, scratch))
        self.decode_steps += 1
        seconds = time.perf_counter() - start
        for request, row in zip(requests, rows):
            request.decode_seconds += seconds
            self._emit(request, row)

    def _emit(self, request: Request, logits: np.ndarray) -> None:
        token = self._sample(request, logits)
        request.token_ids.append(token)
        if token in request.stop_token_ids:
            request.finished, request.finish_reason = True, "stop"
        elif len(request.token_ids) >= request.max_new_tokens:
            request.finished, request.finish_reason = True, "length"
        else:
            request._pending = [token]
        if request.on_token is not None:
            piece = ""
            if self._has_tokenizer():
                text = self.decode_text(request.token_ids)
                piece, request._shown = text[len(request._shown):], text
            request.on_token(request, token, piece)

    @staticmethod
    def _sample(request: Request, logits: np.ndarray) -> int:
        if request.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / request.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if request.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[:int(np.searchsorted(cumulative, request.top_p)) + 1]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(request._rng.choice(len(probs), p=probs))

    def _release_finished(self) -> None:
        for request in [r for r in self.running if r.finished]:
            self._builtin["kv_state_remove_sequence"](self.cache, request.id)
            self.running.remove(request)
            del self.requests[request.id]  # the engine keeps only live requests
            if self._has_tokenizer() and not request.text:
                request.text = self.decode_text(request.token_ids)

    # --- memory -------------------------------------------------------------------------
    def kv_memory(self) -> dict:
        """What the cache holds now: pages in use of the total, their bytes, cached tokens."""
        free = int(self._builtin["attention_kv_cache_get_num_available_pages"](self.cache))
        c = self.config
        layers = c.get("cache_layers", c["num_layers"])
        page_bytes = 2 * layers * c["num_kv_heads"] * self.page_size * c["head_dim"] \
            * np.dtype(c.get("cache_dtype", "float32")).itemsize
        in_use = self.pages_total - free
        return {"page_size": self.page_size, "pages_total": self.pages_total,
                "pages_in_use": in_use, "bytes_per_page": page_bytes,
                "bytes_in_use": in_use * page_bytes,
                "bytes_reserved": self.pages_total * page_bytes,
                "tokens_cached": sum(len(r._cached) for r in self.running),
                "sequences": len(self.running)}

    # --- text -------------------------------------------------------------------------
    def _has_tokenizer(self) -> bool:
        """Whether text can be decoded (a tokenizer given, or the artifact's and `tokenizers`)."""
        if self._tokenizer is None and TOKENIZER_FILE in self.artifact.manifest["files"]:
            try:
                self.tokenizer  # noqa: B018 - loads it
            except ArtifactError:
                return False
        return self._tokenizer is not None
