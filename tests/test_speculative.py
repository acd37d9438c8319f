"""Early-exit self-speculative decoding (issue 6): the draft of the first k layers and the
model's head, verified by the full model in one pass, gives exactly greedy decoding; the
calibration that chooses k and n, and leaves it off where it predicts no speedup."""

import numpy as np
import pytest
import torch

import graft
from graft.passes.early_exit import speculative as spec
from graft.runtime.errors import GraftError
from graft.runtime.generate import Generator
from test_smollm import gguf_path

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "Water boils at", "import numpy as np\n", "My favourite food is",
    "The three primary colors are red,", "In 1969, the first people to walk on",
    "Photosynthesis is the process by which", "To make a cup of tea, first",
    "The largest planet in the solar system is", "class Stack:\n    def __init__(self):",
    "Dear hiring manager,", "The French Revolution began in", "A haiku about autumn:",
    "SELECT name FROM users WHERE", "The speed of light is about", "Here are three tips for",
    "The mitochondria is", "Python lists and tuples differ in that",
]
NEW_TOKENS = 24
DRAFT_LAYERS = 24  # deep enough that some drafts are accepted and some are not


def test_round_model_by_hand():
    # acceptance 0.5, two drafts: 1 + 0.5 + 0.25 tokens per round
    assert spec.expected_tokens(0.5, 2) == pytest.approx(1.75)
    # two drafts at 0.25 of a step each, a verify of three tokens at 1.2 steps
    assert spec.predicted_speedup(0.5, 0.25, 2, 0.1) == pytest.approx(1.75 / 1.7)
    acceptance = np.array([0.1, 0.6, 0.9])
    cost = np.array([0.3, 0.5, 0.7])
    chosen = spec.choose(acceptance, cost, max_draft_tokens=4)
    best = max(((spec.predicted_speedup(a, c, n), k + 1, n) for k, (a, c) in
                enumerate(zip(acceptance, cost)) for n in range(1, 5)))
    assert (chosen["predicted_speedup"], chosen["draft_layers"], chosen["draft_tokens"]) == \
        (round(best[0], 3), best[1], best[2])
    assert chosen["enabled"] == (best[0] >= spec.MIN_SPEEDUP)
    off = spec.choose(np.array([0.05, 0.1]), np.array([0.5, 0.8]))
    assert not off["enabled"] and off["predicted_speedup"] < 1


@pytest.fixture(scope="module")
def smollm_draft(tmp_path_factory):
    from graft.frontend.causal_lm import load_hf_causal_lm

    model, tokenizer = load_hf_causal_lm(gguf_path())
    path = tmp_path_factory.mktemp("speculative") / "art"
    graft.compile(gguf_path(), max_seq_len=256, speculative=DRAFT_LAYERS).save(path)
    return model, tokenizer, graft.load(path)


def test_draft_is_the_head_after_layer_k(smollm_draft):
    """The draft's logits are transformers' head and final norm on the hidden state that
    leaves layer k (an independent computation of the same thing)."""
    model, tokenizer, artifact = smollm_draft
    assert set(artifact.functions) == {"prefill", "decode", "score", "draft"}
    lm = artifact.manifest["model"]["causal_lm"]
    assert lm["draft_layers"] == DRAFT_LAYERS and lm["speculative"]["enabled"]
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        expected = model.lm_head(model.model.norm(out.hidden_states[DRAFT_LAYERS][0, -1]))
    generator = Generator(artifact)
    past_k, past_v = generator.empty_cache()
    _, past_k, past_v = generator.prefill(ids[:, :-1].numpy(),
                                          np.arange(ids.shape[1] - 1)[None], past_k, past_v)
    draft = artifact.function("draft")
    logits, new_k, _ = draft(ids[:, -1:].numpy(), np.array([[ids.shape[1] - 1]]),
                             past_k[:DRAFT_LAYERS], past_v[:DRAFT_LAYERS])
    assert new_k.shape == (DRAFT_LAYERS, 1, 3, ids.shape[1], 64)
    np.testing.assert_allclose(logits[0], expected.numpy(), rtol=1e-3, atol=2e-3)


def test_self_speculative_is_greedy_decoding_on_20_prompts(smollm_draft):
    """Always drafting (3 tokens a round) and adapting both give transformers' greedy tokens
    and graft's plain decoding, prompt by prompt."""
    model, tokenizer, artifact = smollm_draft
    generator = Generator(artifact)
    drafted = accepted = checked = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
        reference = out[0, ids.shape[1]:].tolist()
        plain = generator.generate(prompt, NEW_TOKENS, speculative=False)
        always = generator.generate(prompt, NEW_TOKENS, speculative=True, adapt=False,
                                    max_draft_tokens=3)
        adaptive = generator.generate(prompt, NEW_TOKENS, speculative=True)
        assert plain.token_ids == reference, prompt
        assert always.token_ids == reference, prompt
        assert adaptive.token_ids == reference, prompt
        assert plain.speculative is None
        # always 3 drafts, but never past max_new_tokens: with 3, 2 and 1 tokens left, rounds
        # of 2 and 1 drafts and a plain step
        assert always.speculative.plain_steps <= 1
        assert always.speculative.draft_lengths[3] >= always.speculative.rounds - 2
        drafted += always.speculative.drafted
        accepted += always.speculative.accepted
        checked += always.speculative.checked
    assert 0 < accepted < checked <= drafted  # both outcomes of a verify were exercised


def test_adaptive_decoding_turns_itself_off_when_drafting_costs_more(smollm_draft):
    """On this model a verify pass costs more than the drafts it keeps save: the decoder
    measures that and decodes plainly, drafting one token now and then to look again."""
    _, _, artifact = smollm_draft
    result = Generator(artifact).generate(PROMPTS[2], 80, speculative=True)
    stats = result.speculative
    assert stats.plain_steps > 3 * stats.rounds
    assert stats.rounds >= 1  # it looked again at least once


def test_auto_calibration_leaves_it_off_for_smollm():
    """SmolLM2's intermediate layers rarely predict its next token (the head after layer 29
    of 30 agrees about half the time): calibration predicts no speedup, compiles no draft and
    says why in the manifest."""
    from graft.driver import import_model

    from pydoc_data.topics import topics

    from graft.frontend.causal_lm import load_hf_causal_lm

    _, tokenizer = load_hf_causal_lm(gguf_path())
    calibration = [np.array(tokenizer(topics["assert"] + topics["for"]).input_ids[:256])]
    imported = import_model(gguf_path(), max_seq_len=256, speculative="auto",
                            calibration=calibration)
    choice = imported.source["causal_lm"]["speculative"]
    assert "draft" not in imported.signatures and "draft_layers" not in \
        imported.source["causal_lm"]
    assert not choice["enabled"] and "no speedup" in choice["reason"]
    assert choice["calibration_tokens"] == 256
    acceptance = choice["acceptance_by_layer"]
    assert len(acceptance) == 29 and acceptance[-1] > acceptance[0]
    assert choice["predicted_speedup"] < spec.MIN_SPEEDUP


def test_speculative_refusals():
    with pytest.raises(GraftError, match="speculative='auto' chooses the draft on calibration"):
        graft.compile(gguf_path(), speculative="auto")
    with pytest.raises(GraftError, match="explicit cache"):
        graft.compile(gguf_path(), speculative=4, kv_cache="paged")
    with pytest.raises(GraftError, match="draft_layers must be 1 to 29"):
        graft.compile(gguf_path(), speculative=30)
    with pytest.raises(GraftError, match="for causal language models"):
        graft.compile(torch.nn.Linear(2, 2), (torch.ones(1, 2),), speculative=2)
