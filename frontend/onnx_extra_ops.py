"""ONNX ops missing from TVM's importer: Det, TfIdfVectorizer, and the ai.onnx.ml Binarizer
and ArrayFeatureExtractor. Fixes: RMSNormalization over every axis; MatMul and Softmax of
float16/bfloat16, which TVM sums in the half type (a 4096-term fp16 product is 10% off):
here they accumulate in float32, as numpy, PyTorch and ONNX Runtime do."""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


class Det(tvm_onnx.OnnxOpConverter):
    """Determinant of [..., n, n] by Gaussian elimination with partial pivoting, unrolled over
    the static n: each step swaps the largest remaining pivot into place (a swap flips the
    sign), multiplies it into the result and clears the column below it."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        matrix = bb.normalize(inputs[0])
        dtype = str(matrix.ty.dtype)
        size = matrix.ty.shape.values[-1]
        if not isinstance(size, tirx.IntImm):
            raise NotImplementedError("Det of matrices of run-time size")
        size = int(size)
        rank = matrix.ty.ndim
        one, zero = relax.const(1, dtype), relax.const(0, dtype)
        det = None
        for k in range(size):
            column = bb.normalize(relax.op.strided_slice(matrix, [rank - 2, rank - 1], [k, k],
                                                         [size, k + 1]))
            column = relax.op.squeeze(column, [rank - 1])  # [..., n - k]
            pivot_row = relax.op.add(relax.op.argmax(relax.op.abs(column), axis=-1),
                                     relax.const(k, "int64"))  # [...]
            pick = relax.op.astype(relax.op.equal(relax.op.expand_dims(pivot_row, -1), relax.const(
                np.arange(size, dtype=np.int64), "int64")), dtype)  # one-hot, [..., n]
            pivot_values = relax.op.sum(relax.op.multiply(matrix, relax.op.expand_dims(pick, -1)),
                                        axis=-2)  # row pivot_row, [..., n]
            current = relax.op.squeeze(relax.op.strided_slice(matrix, [rank - 2], [k], [k + 1]),
                                       [rank - 2])  # row k, [..., n]
            unit = relax.const(np.eye(size, dtype=dtype)[k])
            swap = relax.op.subtract(pivot_values, current)
            matrix = bb.normalize(relax.op.add(matrix, relax.op.subtract(
                relax.op.multiply(relax.op.expand_dims(unit, -1), relax.op.expand_dims(swap, -2)),
                relax.op.multiply(relax.op.expand_dims(pick, -1), relax.op.expand_dims(swap, -2)))))
            pivot = bb.normalize(relax.op.take(pivot_values, relax.const(k, "int64"), axis=-1))
            swapped = relax.op.not_equal(pivot_row, relax.const(k, "int64"))
            step = relax.op.where(swapped, relax.op.negative(pivot), pivot)
            det = step if det is None else relax.op.multiply(det, step)
            safe = relax.op.where(relax.op.equal(pivot, zero), relax.op.ones_like(pivot), pivot)
            below = relax.const((np.arange(size) > k).astype(dtype))
            column_k = relax.op.take(matrix, relax.const(k, "int64"), axis=rank - 1)  # [..., n]
            factor = relax.op.multiply(relax.op.divide(column_k, relax.op.expand_dims(safe, -1)),
                                       below)
            matrix = bb.normalize(relax.op.subtract(matrix, relax.op.multiply(
                relax.op.expand_dims(factor, -1), relax.op.expand_dims(pivot_values, -2))))
        return det if det is not None else one


class TfIdfVectorizer(tvm_onnx.OnnxOpConverter):
    """n-gram counts over integer tokens, as the ONNX reference counts them: an n-gram of the
    pool (n within [min_gram_length, max_gram_length]) is counted at every position and every
    skip distance 1..max_skip_count+1 where its tokens appear that far apart; unigrams once.
    Each (size, distance) is one vectorized comparison of the input's windows with the pool's
    n-grams of that size; the counts land on their output columns by a constant 0/1 matrix."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        if attr.get("pool_strings"):
            raise NotImplementedError("TfIdfVectorizer over strings")
        x = bb.normalize(relax.op.astype(inputs[0], "int64"))
        one_row = x.ty.ndim == 1
        if one_row:
            x = bb.normalize(relax.op.expand_dims(x, 0))
        length = x.ty.shape.values[1]
        if not isinstance(length, tirx.IntImm):
            raise NotImplementedError("TfIdfVectorizer over a run-time number of tokens")
        length = int(length)
        pool = np.asarray(attr.get("pool_int64s", []), np.int64)
        starts = list(attr["ngram_counts"]) + [len(pool)]
        columns = np.asarray(attr["ngram_indexes"], np.int64)
        width = int(columns.max()) + 1 if columns.size else 0
        low, high = attr["min_gram_length"], attr["max_gram_length"]
        distances = attr.get("max_skip_count", 0) + 1
        total, first_id = None, 0
        for size, (begin, end) in enumerate(zip(starts[:-1], starts[1:]), start=1):
            grams = pool[begin:end].reshape(-1, size)
            ids = range(first_id, first_id + len(grams))
            first_id += len(grams)
            if not low <= size <= high or not len(grams):
                continue
            counts = None
            for distance in range(1, (1 if size == 1 else distances) + 1):
                positions = length - (size - 1) * distance
                if positions <= 0:
                    continue
                windows = relax.op.concat([relax.op.expand_dims(relax.op.strided_slice(
                    x, [1], [k * distance], [k * distance + positions]), 2)
                    for k in range(size)], axis=2)  # [B, L, n]
                same = relax.op.equal(relax.op.expand_dims(windows, 2),
                                      relax.const(grams[None, None], "int64"))  # [B, L, P, n]
                found = relax.op.min(relax.op.astype(same, "float32"), axis=3)
                here = relax.op.sum(found, axis=1)  # [B, P]
                counts = here if counts is None else relax.op.add(counts, here)
            if counts is None:
                continue
            spread = np.zeros((len(grams), width), np.float32)
            spread[np.arange(len(grams)), columns[list(ids)]] = 1.0
            placed = relax.op.matmul(counts, relax.const(spread))
            total = placed if total is None else relax.op.add(total, placed)
        batch = x.ty.shape.values[0]
        if total is None:
            total = relax.op.zeros(relax.ShapeExpr([batch, width]), "float32")
        weights = attr.get("weights")
        mode = attr.get("mode", b"TF")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "IDF":
            present = relax.op.astype(relax.op.greater(total, relax.const(0.0)), "float32")
            total = (relax.op.multiply(present, relax.const(np.asarray(weights, np.float32)))
                     if weights else present)
        elif mode == "TFIDF" and weights:
            total = relax.op.multiply(total, relax.const(np.asarray(weights, np.float32)))
        return relax.op.squeeze(total, [0]) if one_row else total


class Binarizer(tvm_onnx.OnnxOpConverter):
    """ai.onnx.ml: 1 where x > threshold, else 0, in x's type."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        dtype = str(x.ty.dtype)
        above = relax.op.greater(x, relax.const(attr.get("threshold", 0.0), dtype))
        return relax.op.astype(above, dtype)


class ArrayFeatureExtractor(tvm_onnx.OnnxOpConverter):
    """ai.onnx.ml: the listed columns of the last axis (a 1-D input reads as one row)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        indices = relax.op.reshape(bb.normalize(relax.op.astype(inputs[1], "int64")), (-1,))
        if x.ty.ndim == 1:
            x = bb.normalize(relax.op.expand_dims(x, 0))
        return relax.op.take(x, bb.normalize(indices), axis=x.ty.ndim - 1)


HALF_TYPES = ("float16", "bfloat16")


def matmul(a, b, dtype: str):
    """a @ b; half-precision products accumulate in float32."""
    if dtype in HALF_TYPES:
        return relax.op.astype(relax.op.matmul(a, b, out_dtype="float32"), dtype)
    return relax.op.matmul(a, b)


class MatMul(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a = bb.normalize(inputs[0])
        return matmul(a, inputs[1], str(a.ty.dtype))


class Softmax(tvm_onnx.OnnxOpConverter):
    """A half-precision softmax computed in float32 (TVM sums the exponentials in the half
    type), rounded once at the end."""

    @classmethod
    def _convert(cls, tvm_impl, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        dtype = str(x.ty.dtype)
        if dtype not in HALF_TYPES:
            return tvm_impl(bb, inputs, attr, params)
        result = tvm_impl(bb, [relax.op.astype(x, "float32"), *inputs[1:]], attr, params)
        return relax.op.astype(result, dtype)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return cls._convert(tvm_onnx.Softmax._impl_v1, bb, inputs, attr, params)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        return cls._convert(tvm_onnx.Softmax._impl_v13, bb, inputs, attr, params)


class RMSNormalization(tvm_onnx.RMSNormalization):
    """Over every axis (axis 0), TVM's rms_norm kernel fails to build; that case is written
    out as x / sqrt(mean(x^2) + epsilon) * scale."""

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        data = bb.normalize(inputs[0])
        if attr.get("axis", -1) % data.ty.ndim != 0:
            return super()._impl_v23(bb, inputs, attr, params)
        dtype = str(data.ty.dtype)
        compute = "float32" if attr.get("stash_type", 1) == 1 else dtype
        x = relax.op.astype(data, compute)
        mean_square = relax.op.mean(relax.op.multiply(x, x), keepdims=True)
        rms = relax.op.sqrt(relax.op.add(mean_square, relax.const(attr.get("epsilon", 1e-5),
                                                                    compute)))
        normalized = relax.op.multiply(relax.op.divide(x, rms),
                                       relax.op.astype(inputs[1], compute))
        return relax.op.astype(normalized, dtype)


CONVERTERS = {"MatMul": MatMul, "Softmax": Softmax, "RMSNormalization": RMSNormalization,
              "Det": Det, "TfIdfVectorizer": TfIdfVectorizer, "ai.onnx.ml.Binarizer": Binarizer,
              "ai.onnx.ml.ArrayFeatureExtractor": ArrayFeatureExtractor}
