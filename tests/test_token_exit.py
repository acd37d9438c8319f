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
                  calibration=[tokens[:256]]).save(path)  # 192 to fit, 64 held out
    return model, tokens, graft.load(path)


def test_manifest_records_the_exit(exiting):
    _, _, artifact = exiting
    config = artifact.manifest["model"]["causal_lm"]["token_exit"]
    assert config["layer"] == LAYER and config["budget"] == "top1>=0.98"
    assert 0 < config["threshold"] <= 1.01 and config["calibration_tokens"] == 192
    assert {"exit_lower", "exit_upper", "exit_skip"} <= set(artifact.functions)
    # measured on the held-out quarter with the compiled decoder, tightened until it held
    assert config["held_out_tokens"] == 64 and config["held_out_agreement"] >= 0.98
    assert config["held_out_tried"][-1]["threshold"] == config["threshold"]
    assert [t["threshold"] for t in config["held_out_tried"]] == \
        sorted(t["threshold"] for t in config["held_out_tried"])


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
    _, tokens, artifact = exiting
    generator = Generator(artifact)
    plain = generator.generate("The capital of France is", 24, token_exit=False)
    exited = generator.generate("The capital of France is", 24, token_exit=True)
    assert plain.token_exit is None
    # 64 held-out tokens cannot show 98% agreement: the check turned exits off, so by default
    # generation runs every layer in one decode step
    threshold = artifact.manifest["model"]["causal_lm"]["token_exit"]["threshold"]
    default = generator.generate("The capital of France is", 24)
    assert (default.token_exit is None) == (threshold > 1)
    run = exited.token_exit
    assert run.steps == len(exited.token_ids) - 1 and run.exits <= run.steps
    assert run.threshold == artifact.manifest["model"]["causal_lm"]["token_exit"]["threshold"]
    # a low threshold exits often; the decoder counts its steps and exits
    decoder = TokenExitDecoder(generator, threshold=0.5)
    predicted, exited_steps = decoder.predict(tokens[:40])
    assert decoder.steps == 40 and decoder.exits == int(exited_steps.sum()) > 0
    with pytest.raises(GraftError, match="ask for one"):
        generator.generate("Hi", 4, speculative=True, token_exit=True)


def test_token_exit_refusals():
    with pytest.raises(GraftError, match="calibrates its threshold on text"):
        graft.compile(gguf_path(), token_exit="top1>=0.98")
    with pytest.raises(GraftError, match="top-1 agreement"):
        graft.compile(gguf_path(), token_exit="cosine>=0.98", calibration=[np.arange(8)])
    with pytest.raises(GraftError, match="per-token exit runs on the explicit cache"):
        graft.compile(gguf_path(), token_exit="top1>=0.98", kv_cache="paged")


def test_decoder_exit_calibration_in_passes_json_and_report():
    """The import record carries the calibration by layer, and report.html plots it."""
    from types import SimpleNamespace

    from graft.driver import _decoder_exits
    from graft.passes.report import render

    source = {"causal_lm": {
        "speculative": {"draft_layers": 1, "enabled": False, "acceptance_by_layer": [0.1, 0.3],
                        "draft_cost_by_layer": [0.4, 0.7]},
        "token_exit": {"layer": 2, "threshold": 0.95, "candidates": [
            {"layer": 1, "threshold": 0.99, "exit_rate": 0.05, "agreement": 0.99},
            {"layer": 2, "threshold": 0.95, "exit_rate": 0.2, "agreement": 0.991}]}}}
    did = _decoder_exits(SimpleNamespace(source=source))
    assert did["layers"] == {
        "layer 1": {"draft_acceptance": 0.1, "exit_rate": 0.05, "exit_agreement": 0.99},
        "layer 2": {"draft_acceptance": 0.3, "exit_rate": 0.2, "exit_agreement": 0.991}}
    assert did["token_exit"] == {"layer": 2, "threshold": 0.95}
    assert "acceptance_by_layer" not in did["speculative"]
    page = render([{"index": 0, "pass": "import", "did": did}])
    for heading in ("draft acceptance by layer", "exit rate by layer", "exit agreement by layer"):
        assert f"<h3>{heading}</h3>" in page
