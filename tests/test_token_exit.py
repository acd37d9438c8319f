"""Per-token early exit for SmolLM2 (issue 6): the decode step cut at layer k gives the full
model when no token exits; an exiting token's logits are the head on layer k's hidden state and
the K/V it leaves for the skipped layers are their projections of that state; the threshold
calibration by hand."""

import sys

import numpy as np
import pytest
import torch

import graft
from graft.passes.early_exit import token_exit as calm
from graft.runtime.errors import GraftError
from graft.runtime.generate import Generator
from graft.runtime.token_exit import TokenExitDecoder
from test_smollm import gguf_path

LAYER = 24


def test_threshold_by_hand():
    agree = np.array([True, True, False, True, False])
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # one disagreement in five allowed: the four most confident exit (one of them wrong)
    assert calm.threshold_for(agree, confidence, 0.2) == (0.6, 0.8, 0.2)
    # none allowed: only the two above the first wrong one
    assert calm.threshold_for(agree, confidence, 0.0) == (0.8, 0.4, 0.0)
    # a tie at the boundary would let the wrong one in: the tied pair stays out
    assert calm.threshold_for(agree, np.array([0.9, 0.7, 0.7, 0.6, 0.5]), 0.0) == \
        (0.9, 0.2, 0.0)


def test_predicted_speedup_by_hand():
    sizes = {"layers": [10, 10, 10, 10], "skip": [2, 2, 2, 2], "head": 20}
    # exit after 2 layers: always 20 + 20 (lower and its head); half the tokens run 20 + 20
    # more, half write 4 of skipped K/V
    assert calm.predicted_speedup(sizes, 2, 0.5) == pytest.approx(60 / (40 + 2 + 20))
    assert calm.predicted_speedup(sizes, 2, 0.0) == pytest.approx(60 / 80)


@pytest.fixture(scope="module")
def exiting(tmp_path_factory):
    from graft.frontend.causal_lm import load_hf_causal_lm
    from pydoc_data.topics import topics

    model, tokenizer = load_hf_causal_lm(gguf_path())
    text = topics["assert"] + topics["for"] + topics["while"]
    tokens = np.array(tokenizer(text).input_ids, dtype=np.int64)
    path = tmp_path_factory.mktemp("token_exit") / "art"
    graft.compile(gguf_path(), max_seq_len=512, scores=True, token_exit=f"top1>=0.98@{LAYER}",
                  calibration=[tokens[:256]]).save(path)
    return model, tokens, graft.load(path)


def test_manifest_records_the_exit(exiting):
    _, _, artifact = exiting
    config = artifact.manifest["model"]["causal_lm"]["token_exit"]
    assert config["layer"] == LAYER and config["budget"] == "top1>=0.98"
    assert 0 < config["threshold"] <= 1.01 and config["calibration_tokens"] == 256
    assert {"exit_lower", "exit_upper", "exit_skip"} <= set(artifact.functions)


def test_without_exits_the_split_step_is_the_full_model(exiting):
    """Threshold above 1: every token runs exit_lower then exit_upper; teacher-forced, their
    greedy tokens are those of the full model's `score` on the same text."""
    _, tokens, artifact = exiting
    held_out = tokens[256:256 + 160]
    decoder = TokenExitDecoder(Generator(artifact), threshold=1.01)
    predicted, exited = decoder.predict(held_out)
    past = np.zeros((30, 1, 3, 0, 64), np.float32)
    logits = artifact.function("score")(held_out[None], np.arange(len(held_out))[None],
                                        past, past)[0][0]
    assert not exited.any()
    np.testing.assert_array_equal(predicted, logits.argmax(-1))


def test_an_exit_is_the_head_on_that_layer_and_leaves_its_kv(exiting):
    """exit_lower's logits are transformers' norm and head on the hidden state leaving layer
    k; exit_skip appends, for each skipped layer, its K (rotary-embedded) and V projections of
    that hidden state."""
    model, tokens, artifact = exiting
    ids = torch.from_numpy(tokens[:12][None])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[LAYER][:, -1:, :]
        expected_logits = model.lm_head(model.model.norm(hidden))[0, 0]
        position = torch.tensor([[11]])
        cos, sin = model.model.rotary_emb(hidden, position_ids=position)
        block = model.model.layers[LAYER + 2]
        rotary = sys.modules[type(block.self_attn).__module__].apply_rotary_pos_emb
        x = block.input_layernorm(hidden)
        k = block.self_attn.k_proj(x).view(1, 1, 3, 64).transpose(1, 2)
        expected_v = block.self_attn.v_proj(x).view(1, 1, 3, 64).transpose(1, 2)
        expected_k, _ = rotary(k, k, cos, sin)
    generator = Generator(artifact)
    past_k, past_v = generator.empty_cache()
    _, past_k, past_v = generator.prefill(tokens[:11][None], np.arange(11)[None], past_k, past_v)
    logits, state, lower_k, _ = artifact.function("exit_lower")(
        tokens[11:12][None], np.array([[11]]), past_k[:LAYER], past_v[:LAYER])
    np.testing.assert_allclose(logits[0], expected_logits.numpy(), rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(state[0], hidden[0, 0].numpy(), rtol=1e-3, atol=1e-3)
    assert lower_k.shape == (LAYER, 1, 3, 12, 64)
    new_k, new_v = artifact.function("exit_skip")(state, np.array([[11]]), past_k[LAYER:],
                                                 past_v[LAYER:])
    assert new_k.shape == (30 - LAYER, 1, 3, 12, 64)
    np.testing.assert_array_equal(new_k[:, :, :, :11], past_k[LAYER:])  # the past kept as is
    np.testing.assert_allclose(new_k[2, :, :, 11], expected_k[:, :, 0].numpy(), atol=1e-3)
    np.testing.assert_allclose(new_v[2, :, :, 11], expected_v[:, :, 0].numpy(), atol=1e-3)


def test_generation_exits_and_counts(exiting):
    _, _, artifact = exiting
    generator = Generator(artifact)
    plain = generator.generate("The capital of France is", 24, token_exit=False)
    exited = generator.generate("The capital of France is", 24)
    assert plain.token_exit is None
    run = exited.token_exit
    assert run.steps == len(exited.token_ids) - 1 and 0 < run.exits <= run.steps
    assert exited.token_ids[:3] == plain.token_ids[:3]
    with pytest.raises(GraftError, match="ask for one"):
        generator.generate("Hi", 4, speculative=True, token_exit=True)


def test_token_exit_refusals():
    with pytest.raises(GraftError, match="calibrates its threshold on text"):
        graft.compile(gguf_path(), token_exit="top1>=0.98")
    with pytest.raises(GraftError, match="top-1 agreement"):
        graft.compile(gguf_path(), token_exit="cosine>=0.98", calibration=[np.arange(8)])
    with pytest.raises(GraftError, match="per-token exit runs on the explicit cache"):
        graft.compile(gguf_path(), token_exit="top1>=0.98", kv_cache="paged")
