"""Greedy generation with a causal-LM artifact (functions `prefill` and `decode`, the KV cache
passed as explicit tensors).

    prefill(input_ids[1, T], position_ids[1, T], past_k[L, 1, H, P, D], past_v)
        -> (logits[1, V], new_k, new_v)
    decode(input_ids[1, 1], position_ids[1, 1], past_k, past_v) -> (logits[1, V], new_k, new_v)

where position_ids are P .. P+T-1 and new_k/new_v hold the P + T positions. The tokenizer travels in the artifact as
tokenizer.json and is read with the `tokenizers` package (no torch needed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import tvm

from graft.runtime.errors import ArtifactError, RuntimeInputError

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    speculative: object = None  # runtime.speculative.SpeculativeStats, when it drafted
    token_exit: object = None   # runtime.token_exit.TokenExitDecoder (steps, exits, exit_rate)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class ArtifactText:
    """Text in and out through the tokenizer an artifact carries (or one given); needs
    `self.artifact` and `self._tokenizer`."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            path = self.artifact.path / TOKENIZER_FILE
            if TOKENIZER_FILE not in self.artifact.manifest["files"]:
                raise ArtifactError(f"{self.artifact.path} carries no tokenizer; pass token ids")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ArtifactError("generating from text needs the `tokenizers` package "
                                    "(pip install tokenizers), or pass token ids") from None
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Generator(ArtifactText):
    def __init__(self, artifact, tokenizer=None):
        self.artifact = artifact
        config = artifact.manifest.get("model", {}).get("causal_lm")
        if config is None or "prefill" not in artifact.functions:
            raise ArtifactError(f"{artifact.path} is not a causal language model artifact (it "
                                "has no prefill/decode functions); compile a .gguf file or a "
                                "Hugging Face causal LM")
        self.config = config
        self.prefill = artifact.function("prefill")
        self.decode = artifact.function("decode")
        self.eos_token_ids = set(config.get("eos_token_ids", []))
        self.max_seq_len = int(config["max_seq_len"])
        self._tokenizer = tokenizer
        self._speculative = {}  # options -> SpeculativeDecoder

    def empty_cache(self):
        c = self.config
        shape = (c["num_layers"], 1, c["num_kv_heads"], 0, c["head_dim"])
        empty = np.zeros(shape, dtype=c.get("cache_dtype", "float32"))
        return (tvm.runtime.tensor(empty, self.artifact.device),
                tvm.runtime.tensor(empty, self.artifact.device))

    @property
    def can_speculate(self) -> bool:
        return "draft" in self.artifact.functions and "score" in self.artifact.functions

    @property
    def can_exit(self) -> bool:
        return "exit_lower" in self.artifact.functions

    def generate(self, prompt, max_new_tokens: int = 32, on_token=None,
                 speculative: bool | None = None, token_exit: bool | None = None,
                 **speculative_options) -> GenerationResult:
        """Greedy decoding. `prompt` is text or a list of token ids; `on_token(text)` receives
        each new piece of text as it is generated. `speculative`: draft with the artifact's
        first layers and verify (runtime/speculative.py; the same tokens); by default when
        the artifact was compiled with a draft that calibration enabled. Options:
        max_draft_tokens, adapt (False: always draft max_draft_tokens). `token_exit`: per-token
        early exit (runtime/token_exit.py; tokens within the compile's agreement budget); by
        default when the artifact has it, its threshold can be reached, and it does not
        speculate."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise RuntimeInputError("the prompt is empty")
        vocab = int(self.config.get("vocab_size", 0))
        position = next((i for i, t in enumerate(prompt_ids) if vocab and not 0 <= t < vocab),
                        None)
        if position is not None:
            token = prompt_ids[position]
            raise RuntimeInputError(f"token id {token} at prompt position {position} is outside "
                                    f"the vocabulary (ids 0..{vocab - 1})")
        if len(prompt_ids) + max_new_tokens > self.max_seq_len:
            raise RuntimeInputError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the artifact's max_seq_len {self.max_seq_len}")
        if speculative is None:
            speculative = self.can_speculate and bool(
                self.config.get("speculative", {}).get("enabled"))
        if token_exit is None:  # not where the compile's held-out check turned exits off
            token_exit = self.can_exit and not speculative and \
                float(self.config.get("token_exit", {}).get("threshold", 2)) <= 1
        if token_exit and speculative:
            raise RuntimeInputError("speculative decoding and per-token exit are two ways to "
                                    "decode: ask for one")
        if speculative and not self.can_speculate:
            raise ArtifactError(f"{self.artifact.path} has no draft: compile it with "
                                "speculative=... (graft compile --speculative)")
        if token_exit and not self.can_exit:
            raise ArtifactError(f"{self.artifact.path} has no per-token exit: compile it with "
                                "token_exit=... (graft compile --token-exit)")
        device = self.artifact.device
        past_k, past_v = self.empty_cache()
        start = time.perf_counter()
        ids = tvm.runtime.tensor(np.array([prompt_ids], np.int64), device)
        positions = tvm.runtime.tensor(np.arange(len(prompt_ids), dtype=np.int64)[None], device)
        logits, past_k, past_v = self.prefill.run_tvm(ids, positions, past_k, past_v)
        prefill_seconds = time.perf_counter() - start
        generated: list[int] = []
        shown = ""

        def emit(token: int) -> bool:
            nonlocal shown
            generated.append(token)
            if on_token is not None:
                text = self.decode_text(generated)
                on_token(text[len(shown):])
                shown = text
            return token not in self.eos_token_ids and len(generated) < max_new_tokens

        stats = exiting = None
        start = time.perf_counter()
        token = int(np.argmax(logits.numpy()[0]))
        if emit(token):
            if token_exit:
                from graft.runtime.token_exit import TokenExitDecoder

                decoder = TokenExitDecoder(self)
                decoder.continue_greedy(token, len(prompt_ids), past_k, past_v, emit)
                exiting = decoder
            elif speculative:
                from graft.runtime.speculative import SpeculativeDecoder, SpeculativeStats

                key = tuple(sorted(speculative_options.items()))
                decoder = self._speculative.get(key)
                if decoder is None:  # kept: its timings and acceptance carry over
                    decoder = self._speculative[key] = SpeculativeDecoder(
                        self, **speculative_options)
                decoder.stats = stats = SpeculativeStats()
                decoder.continue_greedy(token, len(prompt_ids), past_k, past_v, emit,
                                        max_new_tokens - 1)
            else:
                self._plain_greedy(token, len(prompt_ids), past_k, past_v, emit)
        decode_seconds = time.perf_counter() - start
        text = self.decode_text(generated) if self._tokenizer is not None or isinstance(
            prompt, str) else ""
        return GenerationResult(generated, text, prompt_ids, prefill_seconds, decode_seconds,
                                stats, exiting)

    def _plain_greedy(self, token: int, position: int, past_k, past_v, emit) -> None:
        device = self.artifact.device
        while True:
            ids = tvm.runtime.tensor(np.array([[token]], np.int64), device)
            positions = tvm.runtime.tensor(np.array([[position]], np.int64), device)
            logits, past_k, past_v = self.decode.run_tvm(ids, positions, past_k, past_v)
            token = int(np.argmax(logits.numpy()[0]))
            position += 1
            if not emit(token):
                return
