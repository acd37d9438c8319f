"""W8A8: int8 weights and int8 activations for linear layers, activation scales static per
tensor (from calibration) or dynamic per token, with SmoothQuant smoothing.

Calibration runs the original function with every linear layer's input as an extra output,
and takes each input channel's largest magnitude. Smoothing moves activation outliers into
the weights: s[k] = max|x[:, k]|^alpha / max|W[:, k]|^(1 - alpha); W' = W * s, x' = x / s.
The division by s is folded into the activation quantization (one multiply per element, in
the kernel FuseOps already fuses with the op before it), so no op of the model changes.

    y = matmul(x, permute_dims(W))   ->   xq  = call_tir(quantize_activation, (x, W.act))
                                          acc = call_tir(int8_matmul, (xq, W.wq))
                                          y   = call_tir(rescale, (acc, W.rescale, W.reoffset))

(with reshapes around for inputs of more than two dims). Layers that read the same input share
one quantized copy of it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from graft.ir.weights import MATMUL, PERMUTE, function_weights
from graft.passes.quantize import int8_kernels as K
from graft.passes.quantize.activations import collect_activations, linear_inputs
from graft.passes.quantize.rewrite import rewrite_functions

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def smoothing(x_max, weights: list, alpha: float):
    """SmoothQuant's per-input-channel factors s (ones for alpha None), and the activation
    step of x / s."""
    if alpha is None:
        return np.ones_like(x_max), float(x_max.max() / 127.0)
    w_max = np.maximum(np.max([np.abs(w).max(axis=0) for w in weights], axis=0), 1e-8)
    smooth = np.clip(x_max ** alpha / w_max ** (1 - alpha), 1e-5, 1e5)
    return smooth, float((x_max / smooth).max() / 127.0)


def quantize_weight(w: np.ndarray, smooth: np.ndarray):
    """int8 per output channel of W * s: (q [N, K], step [N])."""
    scaled = w.astype(np.float64) * smooth[None, :]
    step = np.maximum(np.abs(scaled).max(axis=1) / 127.0, 1e-12)
    return np.clip(np.rint(scaled / step[:, None]), -127, 127).astype(np.int8), step


def output_error(x_rows, x_max, weights: list, alpha: float, dynamic: bool) -> float:
    """Relative squared error of x @ W.T over the group's weights, quantized with `alpha`."""
    smooth, step = smoothing(x_max, weights, alpha)
    smoothed = x_rows / smooth
    if dynamic:  # each row its own step
        step = np.maximum(np.abs(smoothed).max(axis=1, keepdims=True) / 127.0, 1e-12)
    xq = np.clip(np.rint(smoothed / step), -128, 127) * step
    err, norm = 0.0, 0.0
    for w in weights:
        q, w_step = quantize_weight(w, smooth)
        exact = x_rows.astype(np.float64) @ w.T.astype(np.float64)
        approx = xq @ (q * w_step[:, None]).T  # (x / s) @ (W * s).T
        err += float(((exact - approx) ** 2).sum())
        norm += float((exact ** 2).sum())
    return err / max(norm, 1e-30)


def quantize_w8a8(state, layers: list, reads: dict, samples: list, alpha, kept: dict,
                  dynamic: bool = False) -> dict:
    """Rewrite every function's linear layers in `layers` to W8A8; return per-layer figures."""
    vnni = K.has_vnni(state.target)
    function = "main" if "main" in state.signatures else next(iter(state.signatures))
    func = state.mod[function]
    weights = function_weights(func, state.signatures[function])
    linear = [(x, w) for x, w, transposed in linear_inputs(func, weights, set(layers))
              if transposed]
    groups: dict = {}
    for x, w in linear:
        groups.setdefault(x, []).append(w)
    group_list = list(groups.items())
    activations = collect_activations(state, function, group_list, samples)

    plan, report = {}, {}
    for (x, names), (x_max, x_rows, _) in zip(group_list, activations):
        x_max = np.maximum(x_max.astype(np.float64), 1e-8)
        weights = [state.params[n] for n in names]
        if alpha == "auto":  # the strength that keeps this input's products closest
            chosen = min(ALPHAS, key=lambda a: output_error(x_rows, x_max, weights, a, dynamic))
        else:
            chosen = alpha
        smooth, step = smoothing(x_max, weights, chosen)
        act = (1.0 / (smooth * (1.0 if dynamic else step))).astype(np.float32)
        for name in names:
            wq, w_step = quantize_weight(state.params[name], smooth)
            correction = -128.0 * wq.astype(np.int64).sum(axis=1)
            if dynamic:  # y = (acc + correction) * row step * weight step
                scale, offset = w_step.astype(np.float32), correction.astype(np.float32)
            else:
                scale = (step * w_step).astype(np.float32)
                offset = (correction * step * w_step).astype(np.float32)
            plan[name] = {"wq": K.pack_vnni(wq), "rescale": scale,
                          "reoffset": offset, "act": act, "group": names[0]}
            error = (wq * w_step[:, None] / smooth[None, :]) - state.params[name]
            report[name] = {"precision": "w8a8",
                            "activation_step": "per token" if dynamic else step,
                            "smooth_alpha": chosen,
                            "weight_error": round(float(np.sqrt(np.mean(error ** 2)) / max(
                                np.sqrt(np.mean(state.params[name].astype(np.float64) ** 2)),
                                1e-30)), 6)}
    _rewrite(state, plan, vnni, kept, dynamic)
    return {name: figures for name, figures in report.items()
            if f"{name}.wq" in state.params}


@relax.expr_functor.mutator
class _W8A8(relax.PyExprMutator):
    def __init__(self, mod, plan: dict, vnni: bool, kept: dict, dynamic: bool):
        super().__init__(mod)
        self.plan, self.vnni, self.kept, self.dynamic = plan, vnni, kept, dynamic
        self.weights: dict = {}
        self.params: dict = {}        # name -> Var, this function's new parameters
        self.quantized: dict = {}     # (x, group) -> quantized input
        self.kernels: dict = {}

    def param(self, name: str, array: np.ndarray):
        if name not in self.params:
            self.params[name] = relax.Var(name, relax.TensorType(list(array.shape),
                                                                 str(array.dtype)))
        return self.params[name]

    def kernel(self, key, make, label):
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make(), label)
        return self.kernels[key]

    def start(self, weights: dict) -> None:
        self.weights, self.params, self.quantized = weights, {}, {}

    def added(self) -> list:
        return list(self.params.values())

    def quantize_input(self, x, shape, rows: int, k: int, entry: dict):
        """(uint8 x, per-row steps or None), emitted once per input."""
        flat = self.builder_.emit(relax.op.reshape(x, [rows, k])) if len(shape) != 2 else x
        factor = self.param(f"{entry['group']}.act", entry["act"])
        if not self.dynamic:
            qf = self.kernel(("q", rows, k), lambda: K.quantize_activation_func([rows, k], k),
                             "quantize_activation")
            return self.builder_.emit(relax.call_tir(
                qf, [flat, factor], relax.TensorType([rows, k], "uint8"))), None
        sf = self.kernel(("rs", rows, k), lambda: K.row_steps_func([rows, k], k), "row_steps")
        steps = self.builder_.emit(relax.call_tir(sf, [flat, factor],
                                                  relax.TensorType([rows], "float32")))
        qf = self.kernel(("qr", rows, k), lambda: K.quantize_rows_func([rows, k], k),
                         "quantize_rows")
        return self.builder_.emit(relax.call_tir(
            qf, [flat, factor, steps], relax.TensorType([rows, k], "uint8"))), steps

    def visit_call_(self, call: relax.Call):
        if not (call.op.same_as(MATMUL) and isinstance(call.args[1], relax.Var)):
            return super().visit_call_(call)
        value = self.lookup_binding(call.args[1])
        if not (isinstance(value, relax.Call) and value.op.same_as(PERMUTE)
                and value.args[0] in self.weights and self.weights[value.args[0]] in self.plan):
            return super().visit_call_(call)
        name = self.weights[value.args[0]]
        entry = self.plan[name]
        x = self.visit_expr(call.args[0])
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape.values]
        k = shape[-1]
        n = entry["rescale"].shape[0]
        rows = int(np.prod(shape[:-1])) if all(isinstance(d, int) for d in shape[:-1]) else None
        why = K.can_use_vnni(rows, k, n) if self.vnni else (
            None if rows is not None else "a symbolic row count")
        if why is not None:
            self.kept[name] = f"w8a8 needs {why}"
            return super().visit_call_(call)
        key = (call.args[0], entry["group"])
        if key not in self.quantized:
            self.quantized[key] = self.quantize_input(x, shape, rows, k, entry)
        xq, steps = self.quantized[key]
        mm = self.kernel(("mm", rows, k, n), lambda: K.int8_matmul_func(rows, k, n, self.vnni),
                         "int8_matmul")
        acc = self.builder_.emit(relax.call_tir(
            mm, [xq, self.param(f"{name}.wq", entry["wq"])],
            relax.TensorType([rows, n], "int32")))
        scales = [self.param(f"{name}.rescale", entry["rescale"]),
                  self.param(f"{name}.reoffset", entry["reoffset"])]
        if self.dynamic:
            rs = self.kernel(("rr", rows, n), lambda: K.rescale_rows_func(rows, n),
                             "rescale_rows")
            y = relax.call_tir(rs, [acc, steps, *scales], relax.TensorType([rows, n],
                                                                          "float32"))
        else:
            rs = self.kernel(("r", rows, n), lambda: K.rescale_func(rows, n), "rescale")
            y = relax.call_tir(rs, [acc, *scales], relax.TensorType([rows, n], "float32"))
        if len(shape) != 2:
            y = relax.op.reshape(self.builder_.emit(y), [*shape[:-1], n])
        return y


def _rewrite(state, plan: dict, vnni: bool, kept: dict, dynamic: bool) -> None:
    def array_of(param: str):
        name, role = param.rsplit(".", 1)
        return plan[name][role]

    rewrite_functions(state, _W8A8(state.mod, plan, vnni, kept, dynamic), array_of)
