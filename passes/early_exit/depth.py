"""Static depth reduction of a decoder language model (the ReplaceMe approach), training-free.

A contiguous run of n layers is removed and replaced by one linear map of the hidden state,
fitted by least squares on calibration text:

1. The model runs on the calibration token sequences; for every start s, the mean cosine
   distance between the hidden state entering layer s and the one entering layer s + n says how
   little the run changes it. The run with the smallest distance is removed (the first layer
   and the final norm are never in it).
2. The map: h -> h + h @ T, T fitted by ridge regression of (h_{s+n} - h_s) on h_s over every
   calibration token, so a strong ridge falls back to plain removal.
3. The map runs at the entry of the first kept layer after the run; the kept layers'
   attention indices are renumbered, so the KV cache holds L - n layers.

This works on the transformers model before graft imports it (so it needs torch, unlike the
rest of graft.passes at import) (`graft.compile` then compiles the
reduced model like any other); `reduce_depth(..., fit_map=False)` gives plain removal of the
same layers, the baseline the map is measured against.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from graft.passes.early_exit.heads import ridge
from graft.passes.quantize.evaluate import row_cosines
from graft.runtime.errors import GraftError

RIDGE = 1e-2  # relative to the mean energy of the hidden states


def reduce_depth(model, calibration, remove: float | int = 0.25, fit_map: bool = True,
                 start: int | None = None):
    """(a reduced copy of `model`, what was done). `calibration`: token id sequences;
    `remove`: a fraction of the layers or a count; `start`: the first removed layer (default:
    chosen as described in the module text)."""
    layers = _decoder_layers(model)
    total = len(layers)
    count = int(round(total * remove)) if isinstance(remove, float) else int(remove)
    if not 1 <= count <= total - 2:
        raise GraftError(f"reduce_depth: removing {count} of {total} layers; at least one "
                         "must go and two must stay")
    if not calibration:
        raise GraftError("reduce_depth fits its map on calibration text: give token id "
                         "sequences")
    states = _hidden_states(model, calibration)   # entering each layer: [layers + 1][rows, D]
    distances = [float(np.mean(1.0 - row_cosines(states[s], states[s + count])))
                 for s in range(1, total - count)]
    if start is None:
        start = 1 + int(np.argmin(distances))
    elif not 1 <= start <= total - count - 1:
        raise GraftError(f"reduce_depth: a run of {count} layers can start at 1 to "
                         f"{total - count - 1}, not {start}")
    end = start + count
    transform = _fit(states[start], states[end]) if fit_map else None

    reduced = copy.deepcopy(model)
    kept = list(_decoder_layers(reduced))
    kept = kept[:start] + kept[end:]
    if transform is not None:
        kept[start] = MappedEntry(kept[start], torch.from_numpy(transform))
    for index, layer in enumerate(kept):
        _attention(layer).layer_idx = index
    reduced.model.layers = torch.nn.ModuleList(kept)
    reduced.config.num_hidden_layers = len(kept)
    if getattr(reduced.config, "layer_types", None):
        types = list(reduced.config.layer_types)
        reduced.config.layer_types = types[:start] + types[end:]
    report = {"removed": list(range(start, end)), "layers": len(kept), "fitted_map": fit_map,
              "cosine_distance": round(distances[start - 1], 4),
              "calibration_tokens": int(len(states[0]))}
    return reduced.eval(), report


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers):
        raise GraftError(f"reduce_depth handles decoder LMs with model.model.layers (Llama, "
                         f"Qwen2, Mistral, ...), not {type(model).__name__}")
    return layers


def _attention(layer):
    inner = layer.inner if isinstance(layer, MappedEntry) else layer
    return inner.self_attn


def _hidden_states(model, calibration) -> list[np.ndarray]:
    per_layer = None
    with torch.no_grad():
        for ids in calibration:
            ids = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(1, -1))
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            # hidden_states[i] enters layer i; the last one is after the final norm
            states = [h[0].double().numpy() for h in out.hidden_states[:-1]]
            per_layer = states if per_layer is None else \
                [np.concatenate([a, b]) for a, b in zip(per_layer, states)]
    return per_layer


def _fit(entering: np.ndarray, leaving: np.ndarray) -> np.ndarray:
    """T [D, D] float32 with leaving ~ entering + entering @ T (ridge)."""
    return ridge(entering, leaving - entering, RIDGE).astype(np.float32)


class MappedEntry(torch.nn.Module):
    """A decoder layer whose input first goes through h -> h + h @ T (the removed run's
    replacement)."""

    def __init__(self, inner, transform):
        super().__init__()
        self.inner = inner
        self.transform = torch.nn.Parameter(transform, requires_grad=False)

    def forward(self, hidden_states, *args, **kwargs):
        return self.inner(hidden_states + hidden_states @ self.transform, *args, **kwargs)
