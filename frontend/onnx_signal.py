"""ONNX signal ops: the window functions, STFT and MelWeightMatrix, with their lengths and
parameters constant or given at run time (onnx_runtime_shapes.sizes_of)."""

from __future__ import annotations

import math

from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import dim_tensor, sizes_of


class _Window(tvm_onnx.OnnxOpConverter):
    """`sum_k coefficient_k * cos(2 pi k n / N)`, N the length (less one when not periodic),
    computed in float64 as the ONNX reference does."""

    coefficients: tuple = ()

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        (length,) = sizes_of(bb, inputs[0], params, f"{cls.__name__}_size")
        periodic = bool(attr.get("periodic", 1))
        dtype = tvm_onnx.get_type(attr.get("output_datatype", 1))
        period = relax.op.astype(inputs[0], "float64")
        if not periodic:
            period = relax.op.subtract(period, relax.const(1.0, "float64"))
        n = relax.op.arange(0, length, 1, "float64")
        phase = relax.op.divide(relax.op.multiply(n, relax.const(2 * math.pi, "float64")),
                                period)
        window = relax.const(cls.coefficients[0], "float64")
        for k, coefficient in enumerate(cls.coefficients[1:], start=1):
            harmonic = relax.op.cos(relax.op.multiply(phase, relax.const(float(k), "float64")))
            window = relax.op.add(window, relax.op.multiply(harmonic,
                                                            relax.const(coefficient, "float64")))
        return relax.op.astype(window, dtype)


class HannWindow(_Window):
    coefficients = (0.5, -0.5)


class HammingWindow(_Window):
    coefficients = (25 / 46, -(1 - 25 / 46))


class BlackmanWindow(_Window):
    coefficients = (0.42, -0.5, 0.08)


class STFT(tvm_onnx.OnnxOpConverter):
    """Short-time Fourier transform: frames of frame_length every frame_step samples (both may
    be given at run time; a window fixes the length), windowed, each multiplied by the DFT
    matrix (angles reduced modulo the length in integers, so they stay accurate)."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        signal, step, window, frame_length = inputs
        signal = bb.normalize(signal)
        batch, samples, parts = signal.ty.shape.values
        int64 = "int64"
        if window is not None:
            window = bb.normalize(window)
            length = window.ty.shape.values[0]
        elif frame_length is not None:
            (length,) = sizes_of(bb, frame_length, params, "stft_length")
        else:
            length = samples
        step = bb.normalize(relax.op.astype(relax.op.reshape(step, ()), int64))
        length_t = dim_tensor(length)
        (frames,) = sizes_of(bb, relax.op.add(relax.op.floor_divide(
            relax.op.subtract(dim_tensor(samples), length_t), step), relax.const(1, int64)),
            params, "stft_frames")
        onesided = bool(attr.get("onesided", 1))
        if onesided and isinstance(length, (int, tirx.IntImm)):
            bins = int(length) // 2 + 1
        elif onesided:
            (bins,) = sizes_of(bb, relax.op.add(relax.op.floor_divide(
                length_t, relax.const(2, int64)), relax.const(1, int64)), params, "stft_bins")
        else:
            bins = length
        starts = relax.op.multiply(relax.op.arange(0, frames, 1, int64), step)
        index = relax.op.add(relax.op.expand_dims(starts, 1),
                             relax.op.expand_dims(relax.op.arange(0, length, 1, int64), 0))
        framed = relax.op.take(signal, bb.normalize(index), axis=1)  # [N, frames, length, 2|1]
        dtype = str(signal.ty.dtype)
        real = relax.op.take(framed, relax.const(0, int64), axis=3)
        imag = (relax.op.take(framed, relax.const(1, int64), axis=3)
                if isinstance(parts, tirx.IntImm) and int(parts) == 2 else None)
        if window is not None:
            real = relax.op.multiply(real, window)
            imag = relax.op.multiply(imag, window) if imag is not None else None
        product = relax.op.floor_mod(relax.op.multiply(
            relax.op.expand_dims(relax.op.arange(0, length, 1, int64), 1),
            relax.op.expand_dims(relax.op.arange(0, bins, 1, int64), 0)), length_t)
        angle = relax.op.divide(relax.op.multiply(relax.op.astype(product, "float64"),
                                                  relax.const(2 * math.pi, "float64")),
                                relax.op.astype(length_t, "float64"))  # [length, bins]
        cos = bb.normalize(relax.op.astype(relax.op.cos(angle), dtype))
        sin = bb.normalize(relax.op.astype(relax.op.sin(angle), dtype))
        out_real = relax.op.matmul(real, cos)
        out_imag = relax.op.negative(relax.op.matmul(real, sin))
        if imag is not None:
            out_real = relax.op.add(out_real, relax.op.matmul(imag, sin))
            out_imag = relax.op.add(out_imag, relax.op.matmul(imag, cos))
        return relax.op.stack([out_real, out_imag], axis=3)


class MelWeightMatrix(tvm_onnx.OnnxOpConverter):
    """Triangular mel filters [dft_length // 2 + 1, num_mel_bins], as the ONNX reference lays
    them out: filter i rises from bin f(i) to f(i + 1) and falls to f(i + 2), f the mel-spaced
    edges rounded down to DFT bins; all five inputs may be given at run time."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        mels_in, dft_in, rate_in, low_in, high_in = inputs
        f64, int64 = "float64", "int64"

        def scalar(value, dtype):
            return bb.normalize(relax.op.astype(relax.op.reshape(value, ()), dtype))

        dft, rate = scalar(dft_in, f64), scalar(rate_in, f64)
        (mels,) = sizes_of(bb, mels_in, params, "mel_bins")
        (spectrum,) = sizes_of(bb, relax.op.add(relax.op.floor_divide(
            scalar(dft_in, int64), relax.const(2, int64)), relax.const(1, int64)), params,
            "mel_spectrum")

        def to_mel(hertz):
            return relax.op.divide(relax.op.multiply(relax.const(2595.0, f64), relax.op.log(
                relax.op.add(relax.const(1.0, f64), relax.op.divide(hertz, relax.const(700.0, f64))))),
                relax.const(math.log(10), f64))

        low, high = to_mel(scalar(low_in, f64)), to_mel(scalar(high_in, f64))
        step = relax.op.divide(relax.op.subtract(high, low),
                               relax.op.add(scalar(mels_in, f64), relax.const(2.0, f64)))

        def edge(shift):  # f(i + shift) for each filter i: [1, M]
            k = relax.op.add(relax.op.arange(0, mels, 1, f64), relax.const(float(shift), f64))
            mel = relax.op.add(relax.op.multiply(k, step), low)
            hertz = relax.op.multiply(relax.const(700.0, f64), relax.op.subtract(relax.op.exp(
                relax.op.multiply(relax.op.divide(mel, relax.const(2595.0, f64)),
                                  relax.const(math.log(10), f64))), relax.const(1.0, f64)))
            bin_ = relax.op.floor(relax.op.divide(relax.op.multiply(
                relax.op.add(dft, relax.const(1.0, f64)), hertz), rate))
            return relax.op.expand_dims(bb.normalize(bin_), 0)

        left, centre, right = edge(0), edge(1), edge(2)
        j = relax.op.expand_dims(relax.op.arange(0, spectrum, 1, f64), 1)  # [J, 1]
        one = relax.const(1.0, f64)
        rise_width = relax.op.subtract(centre, left)
        rising = relax.op.where(
            relax.op.equal(rise_width, relax.const(0.0, f64)),
            relax.op.astype(relax.op.equal(j, centre), f64),
            relax.op.where(relax.op.logical_and(relax.op.greater_equal(j, left),
                                                relax.op.less_equal(j, centre)),
                           relax.op.divide(relax.op.subtract(j, left),
                                           relax.op.maximum(rise_width, one)),
                           relax.const(0.0, f64)))
        fall_width = relax.op.subtract(right, centre)
        falling = relax.op.logical_and(relax.op.logical_and(
            relax.op.greater_equal(j, centre), relax.op.less(j, right)),
            relax.op.greater(fall_width, relax.const(0.0, f64)))
        weights = relax.op.where(falling, relax.op.divide(relax.op.subtract(right, j),
                                                          relax.op.maximum(fall_width, one)),
                                 rising)
        return relax.op.astype(weights, tvm_onnx.get_type(attr.get("output_datatype", 1)))


CONVERTERS = {"HannWindow": HannWindow, "HammingWindow": HammingWindow,
              "BlackmanWindow": BlackmanWindow, "STFT": STFT, "MelWeightMatrix": MelWeightMatrix}
