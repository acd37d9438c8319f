"""Activations of linear layers' inputs on calibration data, for W8A8's scales and smoothing
and for ranking layers by how much error their quantization adds.

The original function is compiled with every linear layer's input as an extra output (bound
to an output var inside the dataflow block) and run on the calibration samples.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from graft import progress
from graft.ir.weights import MATMUL, PERMUTE, bindings

ROWS_KEPT = 4096  # activation rows kept per layer input


def linear_inputs(func: relax.Function, weights: dict, names: set) -> list:
    """(x, weight name, read through permute_dims) for every float `matmul(x, permute_dims(W))`
    and `matmul(x, W)` with W in `names`."""
    transposed = {b.var: weights[b.value.args[0]] for b in bindings(func)
                  if isinstance(b.value, relax.Call) and b.value.op.same_as(PERMUTE)
                  and isinstance(b.value.args[0], relax.Var) and b.value.args[0] in weights
                  and weights[b.value.args[0]] in names}
    found = []
    for b in bindings(func):
        v = b.value
        if not (isinstance(v, relax.Call) and v.op.same_as(MATMUL)
                and str(v.args[0].ty.dtype) == "float32"):
            continue
        if v.args[1] in transposed:
            found.append((v.args[0], transposed[v.args[1]], True))
        elif v.args[1] in weights and weights[v.args[1]] in names:
            found.append((v.args[0], weights[v.args[1]], False))
    return found


def with_taps(func: relax.Function, taps: list) -> relax.Function:
    """The function returning (its result, *taps) as well: each tap bound inside the
    dataflow block to an output var."""
    outputs, blocks = {}, []
    tap_set = {t for t in taps}
    for block in func.body.blocks:
        new = []
        for b in block.bindings:
            new.append(b)
            if b.var in tap_set and b.var not in outputs:
                var = relax.Var(f"tap{len(outputs)}", b.var.ty)
                outputs[b.var] = var
                new.append(relax.VarBinding(var, b.var))
        cls = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else \
            relax.BindingBlock
        blocks.append(cls(new))
    results = [outputs.get(t, t) for t in taps]
    body = relax.SeqExpr(blocks, relax.Tuple([func.body.body, *results]))
    ret = relax.TupleType([func.ret_ty, *[t.ty for t in taps]])
    return relax.Function(func.params, body, ret, func.is_pure, func.attrs)


def collect_activations(state, function: str, groups: list, samples: list,
                        rows_kept: int = ROWS_KEPT) -> list:
    """For each (x, ...) of `groups`: (max |x| per input channel over the calibration samples,
    up to `rows_kept` rows of x, mean x^2 per input channel)."""
    from graft.passes.pipeline import CompileState
    from graft.passes.quantize.evaluate import Evaluator

    func = state.mod[function]
    tapped = relax.transform.Normalize()(tvm.IRModule({function: with_taps(
        func, [x for x, _ in groups])}))
    sub = CompileState(tapped, state.params, state.signatures, target=state.target)
    evaluator = Evaluator(sub, function, {"calibration": samples}, reference=False)
    maxima, rows = [None] * len(groups), [[] for _ in groups]
    squares, counts = [0.0] * len(groups), [0] * len(groups)
    gen = np.random.default_rng(0)
    with progress.step(f"collecting activation ranges on {len(samples)} samples"):
        for outputs in evaluator.run({}, "calibration"):
            taps = outputs[-len(groups):]
            for i, x in enumerate(taps):
                flat = x.reshape(-1, x.shape[-1])
                m = np.abs(flat).max(axis=0)
                maxima[i] = m if maxima[i] is None else np.maximum(maxima[i], m)
                squares[i] = squares[i] + np.square(flat, dtype=np.float64).sum(axis=0)
                counts[i] += len(flat)
                take = min(len(flat), max(rows_kept // len(samples), 1))
                rows[i].append(flat[gen.choice(len(flat), take, replace=False)])
    return [(m, np.concatenate(r), (sq / max(c, 1)).astype(np.float32))
            for m, r, sq, c in zip(maxima, rows, squares, counts)]
