"""PagedKV and the generation engine on a small random Llama (GQA: 4 query heads over 2).

Reference: transformers' own greedy `generate` on the same model. SmolLM2 with real weights is
in test_smollm.py."""

import numpy as np
import pytest
import torch

import graft
from graft.runtime.engine import Engine
from graft.runtime.errors import ArtifactError, GraftError, RuntimeInputError

VOCAB = 256


def random_llama(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return random_llama(2, seed=0)


@pytest.fixture(scope="module")
def paged(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("paged") / "art"
    graft.compile(llama, task="causal-lm", kv_cache="paged", max_seq_len=128).save(path)
    return graft.load(path)


def greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def prompts(lengths, seed=0):
    gen = np.random.default_rng(seed)
    return [gen.integers(0, VOCAB, n).tolist() for n in lengths]


def test_paged_functions_and_manifest(paged):
    assert set(paged.functions) == {"prefill", "decode", "batch_decode"}
    assert "create_kv_cache" not in paged.functions  # made by the engine, not called by users
    lm = paged.manifest["model"]["causal_lm"]
    assert lm["kv_cache"] == "paged" and lm["page_size"] == 16 and lm["cache_layers"] == 2
    record = next(p for p in paged.manifest["passes"] if p["pass"] == "paged_kv")
    # 2 layers x (K and V) x 2 KV heads x 32 dims x 4 bytes
    assert record["did"] == {"layers": 2, "cache_layers": 2, "page_size": 16, "decode_batch": 8,
                             "kv_bytes_per_token": 1024}
    assert [s.dtype for s in paged.function("prefill").inputs] == ["int64", "int64", "object"]


def test_matches_transformers_greedy(llama, paged):
    engine = Engine(paged, max_batch_size=1)
    for prompt in prompts([1, 6, 40]):
        request = engine.generate([prompt], max_new_tokens=20)[0]
        assert request.token_ids == greedy(llama, prompt, 20)
        assert request.finish_reason == "length"


def test_continuous_batching_equals_one_at_a_time(llama, paged):
    """8 prompts of different lengths and budgets through 3 slots: sequences join as others
    finish, and each generates what it generates alone."""
    batch = prompts([3, 17, 5, 30, 1, 9, 12, 2], seed=1)
    budgets = [12, 4, 9, 15, 7, 3, 11, 6]
    engine = Engine(paged, max_batch_size=3)
    requests = [engine.submit(p, n) for p, n in zip(batch, budgets)]
    steps = 0
    while engine.waiting or engine.running:
        assert len(engine.running) <= 3
        engine.step()
        steps += 1
    assert steps < sum(budgets)  # several sequences decoded per step
    alone = Engine(paged, max_batch_size=1)
    for request, prompt, budget in zip(requests, batch, budgets):
        assert request.token_ids == alone.generate([prompt], budget)[0].token_ids
        assert request.token_ids == greedy(llama, prompt, budget)


def test_fork_shares_the_prefix(llama, paged):
    engine = Engine(paged, max_batch_size=4)
    prefix = prompts([40], seed=2)[0]
    parent = engine.submit(prefix, max_new_tokens=10)
    engine.step()  # prefill (40 tokens computed, one generated), then one decode step
    assert parent.prefill_tokens == 40 and engine.prefill_tokens == 40
    assert len(parent.token_ids) == 2
    child = engine.fork(parent, [7, 8, 9], max_new_tokens=6)
    same = engine.fork(parent, max_new_tokens=6)
    engine.run()
    # the parent's cache holds the prompt and its first token; a fork computes only the
    # parent's newest token (not cached yet) and its own prompt
    assert child.prefill_tokens == 4
    assert same.prefill_tokens == 1
    assert engine.prefill_tokens == 40 + 4 + 1
    assert child.token_ids == greedy(llama, prefix + parent.token_ids[:2] + [7, 8, 9], 6)
    assert same.token_ids == parent.token_ids[2:8]


def test_sampling_is_seeded_and_top_p_cuts(llama, paged):
    prompt = prompts([8], seed=3)[0]
    engine = Engine(paged, max_batch_size=4)
    a = engine.submit(prompt, 16, temperature=1.0, seed=7)
    b = engine.submit(prompt, 16, temperature=1.0, seed=7)
    c = engine.submit(prompt, 16, temperature=1.0, seed=8)
    narrow = engine.submit(prompt, 16, temperature=1.0, top_p=1e-6, seed=9)
    engine.run()
    assert a.token_ids == b.token_ids != c.token_ids
    assert narrow.token_ids == greedy(llama, prompt, 16)  # top_p that small keeps the argmax


def test_stop_tokens_and_streaming(llama, paged):
    prompt = prompts([5], seed=4)[0]
    reference = greedy(llama, prompt, 12)
    seen = []
    engine = Engine(paged)
    request = engine.submit(prompt, 12, stop_token_ids=[reference[3]],
                            on_token=lambda r, token, _text: seen.append((r.id, token)))
    engine.run()
    stop_at = reference.index(reference[3]) + 1
    assert request.token_ids == reference[:stop_at] and request.finish_reason == "stop"
    assert seen == [(request.id, t) for t in request.token_ids]


def test_kv_memory_accounting(paged):
    engine = Engine(paged, max_batch_size=2, max_seq_len=64)
    assert engine.kv_memory()["pages_in_use"] == 0
    request = engine.submit(prompts([20], seed=5)[0], 8)
    engine.step()
    memory = engine.kv_memory()
    # a step prefills the 20 and decodes one more: 21 tokens, 2 pages of 16
    assert memory["tokens_cached"] == 21 and memory["pages_in_use"] == 2
    assert memory["bytes_per_page"] == 16 * 1024 and memory["bytes_in_use"] == 2 * 16 * 1024
    engine.run()
    assert request.finished and engine.kv_memory()["pages_in_use"] == 0


def test_bad_requests_are_refused(paged, tiny_artifact):
    engine = Engine(paged, max_seq_len=32)
    with pytest.raises(RuntimeInputError, match="outside the vocabulary"):
        engine.submit([1, VOCAB], 4)
    with pytest.raises(RuntimeInputError, match="exceeds max_seq_len 32"):
        engine.submit([1] * 30, 4)
    with pytest.raises(RuntimeInputError, match="empty"):
        engine.submit([], 4)
    with pytest.raises(ArtifactError, match="--kv-cache paged"):
        Engine(graft.load(tiny_artifact))


def test_paged_needs_a_causal_lm(tiny_model):
    with pytest.raises(GraftError, match="causal language models"):
        graft.compile(tiny_model, (torch.randn(2, 8),), kv_cache="paged")


# --- ShareKV -------------------------------------------------------------------------------
def shared_greedy(model, prompt, new_tokens, owner_of: dict):
    """transformers' own attention, with reader layers handed their owner's cached K/V (a
    cache whose update() returns the owner's entries for a reader, appending nothing)."""
    from transformers.cache_utils import DynamicCache

    class SharedCache(DynamicCache):
        def update(self, keys, values, layer_idx, *args, **kwargs):
            if layer_idx in owner_of:
                owner = self.layers[owner_of[layer_idx]]
                return owner.keys, owner.values
            return super().update(keys, values, layer_idx, *args, **kwargs)

    cache, ids, out, position = SharedCache(config=model.config), torch.tensor([prompt]), [], 0
    with torch.no_grad():
        for _ in range(new_tokens):
            positions = torch.arange(position, position + ids.shape[1])[None]
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                           position_ids=positions).logits
            position += ids.shape[1]
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


@pytest.fixture(scope="module")
def llama4():
    return random_llama(4, seed=1)


def test_share_kv_groups_read_the_owners_cache(llama4, tmp_path):
    from graft import passes as P

    calibration = prompts([32, 32, 32, 32], seed=6)
    compiled = graft.compile(llama4, task="causal-lm", kv_cache="paged", max_seq_len=128,
                             scores=True, calibration=calibration,
                             passes=[P.ShareKV(groups=[[0, 1], [2, 3]])])
    did = compiled.manifest["passes"][0]["did"]
    assert did["groups"] == [[0, 1], [2, 3]] and did["cache_layers"] == 2
    assert (did["kv_bytes_per_token_before"], did["kv_bytes_per_token_after"]) == (2048, 1024)
    assert [d["kv_bytes_per_token"] for d in did["layers"].values()] == [512, 0, 512, 0]
    assert did["perplexity_ratio"]["held_out"] > 1  # measured, and sharing costs something
    compiled.save(tmp_path / "art")
    engine = Engine(graft.load(tmp_path / "art"), max_batch_size=4)
    assert engine.kv_memory()["bytes_per_page"] == 16 * 2 * 512  # 16 tokens, 2 of 4 layers
    batch = prompts([3, 17, 30], seed=7)
    for request, prompt in zip(engine.generate(batch, 12), batch):
        assert request.token_ids == shared_greedy(llama4, prompt, 12, {1: 0, 3: 2})
        assert request.token_ids != greedy(llama4, prompt, 12)  # sharing changed something


def test_share_kv_search_keeps_the_budget(llama4, tmp_path):
    from graft import passes as P

    calibration = prompts([48] * 6, seed=8)
    compiled = graft.compile(llama4, task="causal-lm", kv_cache="paged", max_seq_len=128,
                             scores=True, calibration=calibration, dump_dir=tmp_path,
                             passes=[P.ShareKV("perplexity<=1.02")])
    did = compiled.manifest["passes"][0]["did"]
    trials = did["search"]
    assert sorted(t["layer"] for t in trials) == [1, 2, 3]  # every layer after the first tried
    for trial in trials:  # a layer is kept exactly when the ratio it reached was in budget
        assert trial["kept"] == (trial["perplexity_ratio"] <= 1.02)
    assert did["perplexity_ratio"]["search"] <= 1.02
    assert did["cache_layers"] == 4 - sum(t["kept"] for t in trials)
    report = (tmp_path / "report.html").read_text()
    assert "kv bytes per token by layer" in report and "ShareKV search" in report
    assert report.count("<tr class=share-step>") == 3  # one row per layer tried


def test_share_kv_needs_paged_scores_and_sane_groups(llama4):
    from graft import passes as P

    with pytest.raises(GraftError, match="kv_cache='paged'"):
        graft.compile(llama4, task="causal-lm", passes=[P.ShareKV(groups=[[0, 1]])])
    with pytest.raises(GraftError, match="scores=True"):
        graft.compile(llama4, task="causal-lm", kv_cache="paged",
                      passes=[P.ShareKV(groups=[[0, 1]])])
    with pytest.raises(GraftError, match="each group is an owner"):
        graft.compile(llama4, task="causal-lm", kv_cache="paged", scores=True,
                      passes=[P.ShareKV(groups=[[2, 1]])])
    with pytest.raises(GraftError, match="perplexity ratios"):
        P.ShareKV("cosine>=0.9")


def test_engine_runs_without_torch(paged):
    from conftest import BLOCK_TORCH, run_python

    script = BLOCK_TORCH + r"""
import graft
from graft.runtime.engine import Engine
engine = Engine(graft.load(sys.argv[1]), max_batch_size=2)
requests = engine.generate([[1, 2, 3], [4, 5]], 5)
print("ok", *(len(r.token_ids) for r in requests))
"""
    result = run_python(script, str(paged.path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "5", "5"]


def test_paged_composes_with_int4_weights(llama, tmp_path):
    """Quantize's packed weights and expansion kernels go through PagedKV: the paged int4
    build generates what the explicit-cache int4 build does."""
    from graft import passes as P
    from graft.runtime.generate import Generator

    for cache in ("paged", "explicit"):
        graft.compile(llama, task="causal-lm", kv_cache=cache, max_seq_len=128,
                      passes=[P.Quantize("int4", group_size=32)]).save(tmp_path / cache)
    engine = Engine(graft.load(tmp_path / "paged"), max_batch_size=4)
    explicit = Generator(graft.load(tmp_path / "explicit"))
    batch = prompts([4, 19, 33], seed=9)
    for request, prompt in zip(engine.generate(batch, 10), batch):
        assert request.token_ids == explicit.generate(prompt, 10).token_ids


def test_paged_is_refused_for_cuda_before_importing(llama):
    with pytest.raises(GraftError, match="the target is cuda"):
        graft.compile(llama, task="causal-lm", kv_cache="paged", target="cuda")
