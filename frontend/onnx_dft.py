"""ONNX DFT (opset 17 and 20), which TVM's importer lacks, as matmuls with cos/sin tables.

The signal length is static, so each transform is two matmuls with constant tables built here:
forward and inverse complex DFTs, the one-sided forward transform of a real signal, and the
inverse of a one-sided spectrum (numpy's irfft: the imaginary parts of the DC and Nyquist terms
are ignored). `dft_length` pads or truncates the signal. A run-time axis (opset 20 makes it an
input) is supported where every axis it could name gives the same output shape: each is
computed and the one named is selected.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


def _const_int(value, params):
    value = tvm_onnx.get_constant(value, params) if value is not None else None
    if isinstance(value, tvm.ir.GenericConst):
        return int(value.value.numpy().reshape(-1)[0])
    return value


class DFT(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        return cls._convert(bb, inputs, attr, params, attr.get("axis", 1))

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        axis = _const_int(inputs[2], params) if len(inputs) > 2 and inputs[2] is not None \
            else -2
        return cls._convert(bb, inputs, attr, params, axis)

    @classmethod
    def _convert(cls, bb, inputs, attr, params, axis):
        x = bb.normalize(inputs[0])
        rank = x.ty.ndim
        length = _const_int(inputs[1], params) if len(inputs) > 1 and inputs[1] is not None \
            else None
        if length is not None and not isinstance(length, int):
            raise NotImplementedError("DFT with a run-time dft_length")
        inverse, onesided = bool(attr.get("inverse", 0)), bool(attr.get("onesided", 0))
        if isinstance(axis, int):
            return _transform(bb, x, axis % rank, length, inverse, onesided)
        candidates = [_transform(bb, x, k, length, inverse, onesided) for k in range(rank - 1)]
        shapes = {tuple(int(d) for d in bb.normalize(c).ty.shape.values) for c in candidates}
        if len(shapes) != 1:
            raise NotImplementedError("DFT along a run-time axis whose choice changes the "
                                      "output shape")
        axis = bb.normalize(relax.op.reshape(relax.op.astype(axis, "int64"), []))
        axis = bb.emit(relax.op.where(relax.op.less(axis, relax.const(0, "int64")),
                                      relax.op.add(axis, relax.const(rank, "int64")), axis))
        result = candidates[0]
        for k, candidate in enumerate(candidates[1:], start=1):
            result = bb.emit(relax.op.where(relax.op.equal(axis, relax.const(k, "int64")),
                                            candidate, result))
        return result


def _transform(bb, x, axis, length, inverse, onesided):
    dims = [int(d) if isinstance(d, tirx.IntImm) else d for d in x.ty.shape.values]
    size = dims[axis]
    if not isinstance(size, int):
        raise NotImplementedError("DFT along a dim of run-time size")
    complex_input = dims[-1] == 2
    order = [d for d in range(len(dims) - 1) if d != axis] + [axis]  # signal axis last
    real = bb.normalize(relax.op.permute_dims(
        relax.op.strided_slice(x, [len(dims) - 1], [0], [1]), order + [len(dims) - 1]))
    real = bb.normalize(relax.op.squeeze(real, [len(dims) - 1]))
    imag = None
    if complex_input:
        imag = bb.normalize(relax.op.squeeze(relax.op.permute_dims(
            relax.op.strided_slice(x, [len(dims) - 1], [1], [2]), order + [len(dims) - 1]),
            [len(dims) - 1]))
    if inverse and onesided:
        total = length or 2 * (size - 1)
        rows = min(size, total // 2 + 1)
        k, t = np.arange(rows)[:, None], np.arange(total)[None, :]
        weight = np.full((rows, 1), 2.0)
        weight[0] = 1.0
        if total % 2 == 0 and rows == total // 2 + 1:
            weight[-1] = 1.0
        angle = 2 * np.pi * k * t / total
        cos_table, sin_table = weight * np.cos(angle) / total, weight * np.sin(angle) / total
        parts = [_matmul(real, cos_table, rows)]
        if imag is not None:
            parts.append(relax.op.negative(_matmul(imag, sin_table, rows)))
        out_real = parts[0] if len(parts) == 1 else relax.op.add(*parts)
        outputs = [out_real]
    else:
        total = length or size
        bins = total // 2 + 1 if onesided else total
        n, k = np.arange(min(size, total))[:, None], np.arange(bins)[None, :]
        angle = 2 * np.pi * n * k / total
        scale = 1.0 / total if inverse else 1.0
        sign = 1.0 if inverse else -1.0
        cos_table, sin_table = np.cos(angle) * scale, sign * np.sin(angle) * scale
        rows = n.shape[0]
        out_real = _matmul(real, cos_table, rows)
        out_imag = _matmul(real, sin_table, rows)
        if imag is not None:
            out_real = relax.op.subtract(out_real, _matmul(imag, sin_table, rows))
            out_imag = relax.op.add(out_imag, _matmul(imag, cos_table, rows))
        outputs = [out_real, out_imag]
    back = list(np.argsort(order))
    stacked = relax.op.stack([relax.op.permute_dims(bb.normalize(o), back) for o in outputs],
                             axis=-1)
    return bb.normalize(stacked)


def _matmul(signal, table, rows):
    """signal[..., :rows] @ table (the signal truncated to, or zero-padded to, `rows`), summed
    in float64: float32 sums of a long signal miss the spec's values by more than its tests
    allow."""
    length = int(signal.ty.shape.values[-1])
    if length > rows:
        signal = relax.op.strided_slice(signal, [-1], [0], [rows])
    elif length < rows:
        table = table[:length]
    dtype = str(signal.ty.dtype)
    product = relax.op.matmul(relax.op.astype(signal, "float64"), relax.const(table, "float64"))
    return relax.op.astype(product, dtype)


CONVERTERS = {"DFT": DFT}
