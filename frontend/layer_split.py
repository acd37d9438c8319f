"""A decoder LM's decode step cut at layer k, for per-token early exit (CALM-style):

    exit_lower(input_ids[1, 1], position_ids[1, 1], past_k[k, 1, H, P, D], past_v)
        -> (logits of the head after layer k [1, V], hidden state leaving layer k [1, C],
            new_k[k, 1, H, P + 1, D], new_v)
    exit_upper(hidden[1, C], position_ids, past_k[L - k, ...], past_v)
        -> (logits [1, V], new_k[L - k, ...], new_v)       the layers from k on
    exit_skip (hidden[1, C], position_ids, past_k[L - k, ...], past_v)
        -> (new_k[L - k, ...], new_v)                      what a token that exits leaves
            in the cache of the layers it skipped: each layer's K/V projection (with its
            rotary embedding) of the exiting hidden state, so later tokens attend to it

Each wraps the whole transformers model (`self.lm`), so the weights keep the names they have
in prefill/decode and the artifact stores them once.
"""

from __future__ import annotations

import sys


def explicit_cache(config, past_k, past_v, offset: int = 0):
    """A transformers cache whose layers offset.. hold the given past tensors; the layers
    below offset are placeholders no layer reads."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PastLayer(DynamicLayer):
        """A cache layer holding an explicit past tensor (possibly of length 0)."""

        def __init__(self, keys, values):
            super().__init__()
            self.keys, self.values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

        def get_seq_length(self):
            # upstream tests keys.numel() == 0: a data-dependent guard on the past length
            return self.keys.shape[-2]

    cache = DynamicCache(config=config)
    below = [PastLayer(past_k[0][:, :, :0], past_v[0][:, :, :0])] * offset if offset else []
    cache.layers = below + [PastLayer(past_k[i], past_v[i]) for i in range(past_k.shape[0])]
    return cache


def _run_layers(lm, layers, hidden, position_ids, cache):
    inner = lm.model
    embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        out = layer(hidden, attention_mask=None, position_ids=position_ids, cache=cache,
                    use_cache=True, position_embeddings=embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def wrappers(model, layer: int) -> dict:
    """{function name: torch module} for the three functions of the module text."""
    import torch

    count = len(model.model.layers)

    class Lower(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, position_ids, past_k, past_v):
            cache = explicit_cache(self.lm.config, past_k, past_v)
            hidden = self.lm.model.embed_tokens(input_ids)
            hidden = _run_layers(self.lm, self.lm.model.layers[:layer], hidden, position_ids,
                                 cache)
            logits = self.lm.lm_head(self.lm.model.norm(hidden))[:, -1, :]
            return (logits, hidden[:, -1, :], torch.stack([c.keys for c in cache.layers]),
                    torch.stack([c.values for c in cache.layers]))

    class Upper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, hidden, position_ids, past_k, past_v):
            cache = explicit_cache(self.lm.config, past_k, past_v, offset=layer)
            state = _run_layers(self.lm, self.lm.model.layers[layer:], hidden[:, None, :],
                                position_ids, cache)
            logits = self.lm.lm_head(self.lm.model.norm(state))[:, -1, :]
            own = cache.layers[layer:]
            return (logits, torch.stack([c.keys for c in own]),
                    torch.stack([c.values for c in own]))

    class Skip(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, hidden, position_ids, past_k, past_v):
            state = hidden[:, None, :]
            cos, sin = self.lm.model.rotary_emb(state, position_ids=position_ids)
            keys, values = [], []
            for index, block in enumerate(self.lm.model.layers[layer:]):
                attention = block.self_attn
                rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
                x = block.input_layernorm(state)
                shape = (1, 1, -1, attention.head_dim)
                k = attention.k_proj(x).view(shape).transpose(1, 2)
                v = attention.v_proj(x).view(shape).transpose(1, 2)
                k, _ = rotary(k, k, cos, sin)
                keys.append(torch.cat([past_k[index], k], dim=2))
                values.append(torch.cat([past_v[index], v], dim=2))
            return torch.stack(keys), torch.stack(values)

    if not 1 <= layer < count:
        from graft.runtime.errors import GraftError

        raise GraftError(f"the exit layer must be 1 to {count - 1} (the model has {count} "
                         f"layers), got {layer}")
    return {"exit_lower": Lower(model).eval(), "exit_upper": Upper(model).eval(),
            "exit_skip": Skip(model).eval()}
