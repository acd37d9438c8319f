"""ONNX's recurrent layers, RNN, GRU and LSTM, which TVM's importer lacks.

Unrolled over the sequence, which must have a static length (batch may be symbolic): one
matmul of all time steps' inputs with W up front, then per step the recurrence with R. Gate
orders, activations (`activations`, `activation_alpha/beta`), `clip`, `direction` (forward,
reverse, bidirectional), `layout`, peepholes, GRU's `linear_before_reset` and LSTM's
`input_forget` follow the ONNX operator spec. `sequence_lens` masks the steps past each
sequence's end: its state stops changing there and its outputs are zero.
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

_WITH_ALPHA = {"LeakyRelu": 1, "ThresholdedRelu": 1, "Elu": 1, "HardSigmoid": 2,
               "ScaledTanh": 2, "Affine": 2}
_DEFAULT_ALPHA = {"LeakyRelu": (0.01,), "ThresholdedRelu": (1.0,), "Elu": (1.0,),
                  "HardSigmoid": (0.2, 0.5), "ScaledTanh": (1.0, 1.0), "Affine": (1.0, 0.0)}


def _activation(name: str, params: tuple):
    op = relax.op

    def c(v):
        return relax.const(float(v), "float32")

    table = {
        "Sigmoid": op.sigmoid,
        "Tanh": op.tanh,
        "Relu": op.nn.relu,
        "Softsign": lambda x: op.divide(x, op.add(c(1), op.abs(x))),
        "Softplus": lambda x: op.log(op.add(c(1), op.exp(x))),
        "LeakyRelu": lambda x: op.where(op.less(x, c(0)), op.multiply(c(params[0]), x), x),
        "ThresholdedRelu": lambda x: op.where(op.greater(x, c(params[0])), x, op.zeros_like(x)),
        "Elu": lambda x: op.where(op.less(x, c(0)),
                                  op.multiply(c(params[0]), op.subtract(op.exp(x), c(1))), x),
        "HardSigmoid": lambda x: op.clip(op.add(op.multiply(c(params[0]), x), c(params[1])),
                                         0.0, 1.0),
        "ScaledTanh": lambda x: op.multiply(c(params[0]), op.tanh(op.multiply(c(params[1]), x))),
        "Affine": lambda x: op.add(op.multiply(c(params[0]), x), c(params[1])),
    }
    if name not in table:
        raise NotImplementedError(f"recurrent activation {name!r}")
    return table[name]


def _activations(attr, defaults: list[str], directions: int) -> list[list]:
    """Per direction, the layer's activation functions with their alpha/beta bound."""
    names = [a.decode() if isinstance(a, bytes) else a for a in attr.get("activations", [])]
    names = names or defaults * directions
    alphas = list(attr.get("activation_alpha", []))
    betas = list(attr.get("activation_beta", []))
    functions = []
    for name in names:
        wanted = _WITH_ALPHA.get(name, 0)
        params = list(_DEFAULT_ALPHA.get(name, ()))
        if wanted >= 1 and alphas:
            params[0] = alphas.pop(0)
        if wanted == 2 and betas:
            params[1] = betas.pop(0)
        functions.append(_activation(name, tuple(params)))
    per = len(defaults)
    return [functions[d * per:(d + 1) * per] for d in range(directions)]


class _Recurrent(tvm_onnx.OnnxOpConverter):
    gates = 1  # blocks of hidden_size rows in W and R
    default_activations = ["Tanh"]

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (8 - len(inputs))
        x, w, r, bias, seq_lens, initial_h = inputs[:6]
        x, w, r = (bb.normalize(v) for v in (x, w, r))
        if attr.get("layout", 0):
            x = bb.normalize(relax.op.permute_dims(x, [1, 0, 2]))
        steps = x.ty.shape.values[0]
        if not isinstance(steps, tirx.IntImm):
            raise NotImplementedError(f"{cls.__name__} over a sequence of run-time length "
                                      "(graft unrolls it: the length must be static)")
        steps = int(steps)
        batch = x.ty.shape.values[1]
        hidden = int(attr["hidden_size"]) if "hidden_size" in attr else \
            int(r.ty.shape.values[-1])
        direction = attr.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        directions = 2 if direction == "bidirectional" else 1
        functions = _activations(attr, cls.default_activations, directions)
        clip = attr.get("clip")

        mask = None
        if seq_lens is not None:
            lengths = relax.op.astype(relax.op.reshape(seq_lens, [-1, 1]), "int64")
            mask = lambda t: relax.op.less(relax.const(t, "int64"), lengths)  # noqa: E731

        outputs, finals, extras = [], [], []
        for d in range(directions):
            take = lambda v, d=d: None if v is None else bb.normalize(  # noqa: E731
                relax.op.squeeze(relax.op.strided_slice(v, [0], [d], [d + 1]), [0]))
            reverse = direction == "reverse" or d == 1
            state = cls.initial_state(bb, take, inputs, batch, hidden)
            w_d, r_d = take(w), take(r)
            bias_d = take(bias)
            # every step's input projection at once: [steps, batch, gates * hidden]
            projected = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w_d)))
            ys = [None] * steps
            order = range(steps - 1, -1, -1) if reverse else range(steps)
            for t in order:
                x_t = bb.normalize(relax.op.squeeze(
                    relax.op.strided_slice(projected, [0], [t], [t + 1]), [0]))
                new_state = cls.step(bb, x_t, state, r_d, bias_d, hidden, functions[d], clip,
                                     take, inputs, attr)
                if mask is not None:
                    keep = mask(t)
                    new_state = [bb.emit(relax.op.where(keep, n, o))
                                 for n, o in zip(new_state, state)]
                    ys[t] = bb.emit(relax.op.where(keep, new_state[0],
                                                   relax.op.zeros_like(new_state[0])))
                else:
                    ys[t] = new_state[0]
                state = new_state
            outputs.append(relax.op.stack(ys, axis=0))  # [steps, batch, hidden]
            finals.append(state[0])
            extras.append(state[1:])
        y = relax.op.stack(outputs, axis=1)  # [steps, directions, batch, hidden]
        y_h = relax.op.stack(finals, axis=0)
        if attr.get("layout", 0):
            y = relax.op.permute_dims(y, [2, 0, 1, 3])
            y_h = relax.op.permute_dims(y_h, [1, 0, 2])
        results = [y, y_h]
        for i in range(len(extras[0])):
            y_c = relax.op.stack([e[i] for e in extras], axis=0)
            results.append(relax.op.permute_dims(y_c, [1, 0, 2]) if attr.get("layout", 0)
                           else y_c)
        return relax.Tuple([bb.normalize(v) for v in results])

    @classmethod
    def initial_state(cls, bb, take, inputs, batch, hidden):
        h = take(inputs[5])
        return [h if h is not None else relax.op.zeros([batch, hidden], "float32")]

    @staticmethod
    def _gate(value, index, hidden):
        return relax.op.strided_slice(value, [1], [index * hidden], [(index + 1) * hidden])

    @classmethod
    def _bias_split(cls, bias_d, hidden):
        """B = [Wb, Rb], each `gates` blocks of hidden_size."""
        if bias_d is None:
            return None, None
        width = cls.gates * hidden
        return (relax.op.strided_slice(bias_d, [0], [0], [width]),
                relax.op.strided_slice(bias_d, [0], [width], [2 * width]))

    @staticmethod
    def _clipped(value, clip):
        return value if clip is None else relax.op.clip(value, -float(clip), float(clip))


class RNN(_Recurrent):
    gates = 1
    default_activations = ["Tanh"]

    @classmethod
    def step(cls, bb, x_t, state, r_d, bias_d, hidden, functions, clip, take, inputs, attr):
        (h,) = state
        value = relax.op.add(x_t, relax.op.matmul(h, relax.op.permute_dims(r_d)))
        wb, rb = cls._bias_split(bias_d, hidden)
        if wb is not None:
            value = relax.op.add(value, relax.op.add(wb, rb))
        return [bb.emit(functions[0](cls._clipped(value, clip)))]


class GRU(_Recurrent):
    gates = 3
    default_activations = ["Sigmoid", "Tanh"]

    @classmethod
    def step(cls, bb, x_t, state, r_d, bias_d, hidden, functions, clip, take, inputs, attr):
        (h,) = state
        f, g = functions
        wb, rb = cls._bias_split(bias_d, hidden)
        gate = lambda v, i: cls._gate(v, i, hidden)  # noqa: E731
        bias_gate = lambda b, i: relax.op.strided_slice(b, [0], [i * hidden],  # noqa: E731
                                                        [(i + 1) * hidden])
        h_proj = bb.emit(relax.op.matmul(h, relax.op.permute_dims(r_d)))  # [batch, 3 * hidden]
        pre = []
        for i in range(2):  # z, r
            v = relax.op.add(gate(x_t, i), gate(h_proj, i))
            if wb is not None:
                v = relax.op.add(v, relax.op.add(bias_gate(wb, i), bias_gate(rb, i)))
            pre.append(f(cls._clipped(v, clip)))
        z, r = (bb.emit(v) for v in pre)
        # a transpose of its own: TVM's FuseTransposeMatmul fails where a transposed weight
        # also feeds something besides the matmul
        r_h = relax.op.permute_dims(relax.op.strided_slice(r_d, [0], [2 * hidden], [3 * hidden]))
        if attr.get("linear_before_reset", 0):
            recur = gate(h_proj, 2)
            if rb is not None:
                recur = relax.op.add(recur, bias_gate(rb, 2))
            candidate = relax.op.add(gate(x_t, 2), relax.op.multiply(r, recur))
        else:
            candidate = relax.op.add(gate(x_t, 2), relax.op.matmul(relax.op.multiply(r, h), r_h))
            if rb is not None:
                candidate = relax.op.add(candidate, bias_gate(rb, 2))
        if wb is not None:
            candidate = relax.op.add(candidate, bias_gate(wb, 2))
        candidate = bb.emit(g(cls._clipped(candidate, clip)))
        one = relax.const(1.0, "float32")
        return [bb.emit(relax.op.add(relax.op.multiply(relax.op.subtract(one, z), candidate),
                                     relax.op.multiply(z, h)))]


class LSTM(_Recurrent):
    gates = 4
    default_activations = ["Sigmoid", "Tanh", "Tanh"]

    @classmethod
    def initial_state(cls, bb, take, inputs, batch, hidden):
        h, c = take(inputs[5]), take(inputs[6])
        zeros = relax.op.zeros([batch, hidden], "float32")
        return [h if h is not None else zeros, c if c is not None else zeros]

    @classmethod
    def step(cls, bb, x_t, state, r_d, bias_d, hidden, functions, clip, take, inputs, attr):
        h, c = state
        f, g, act_h = functions
        value = relax.op.add(x_t, relax.op.matmul(h, relax.op.permute_dims(r_d)))
        wb, rb = cls._bias_split(bias_d, hidden)
        if wb is not None:
            value = relax.op.add(value, relax.op.add(wb, rb))
        value = bb.emit(value)
        peep = take(inputs[7])
        peephole = lambda i: relax.op.strided_slice(peep, [0], [i * hidden],  # noqa: E731
                                                    [(i + 1) * hidden])
        gate = lambda i: cls._gate(value, i, hidden)  # noqa: E731  (order i, o, f, c)
        i_pre, o_pre, f_pre = gate(0), gate(1), gate(2)
        if peep is not None:
            i_pre = relax.op.add(i_pre, relax.op.multiply(peephole(0), c))
            f_pre = relax.op.add(f_pre, relax.op.multiply(peephole(2), c))
        i_t = bb.emit(f(cls._clipped(i_pre, clip)))
        f_t = bb.emit(f(cls._clipped(f_pre, clip)))
        if attr.get("input_forget", 0):
            f_t = bb.emit(relax.op.subtract(relax.const(1.0, "float32"), i_t))
        c_cand = g(cls._clipped(gate(3), clip))
        c_new = bb.emit(relax.op.add(relax.op.multiply(f_t, c), relax.op.multiply(i_t, c_cand)))
        if peep is not None:
            o_pre = relax.op.add(o_pre, relax.op.multiply(peephole(1), c_new))
        o_t = f(cls._clipped(o_pre, clip))
        return [bb.emit(relax.op.multiply(o_t, act_h(c_new))), c_new]


CONVERTERS = {"RNN": RNN, "GRU": GRU, "LSTM": LSTM}
