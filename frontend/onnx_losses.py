"""NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss, missing from TVM's importer.

Losses are training ops, but exporters leave them in evaluation graphs (a model that reports
its loss, torch.onnx's CrossEntropyLoss). As the ONNX reference computes them: the class
axis is 1; a target equal to `ignore_index` contributes 0 and weighs 0; `weight` gives each
class a weight; `mean` divides by the summed weights where there are any, else by the count.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import optional_input


def negative_log_likelihood(bb, log_probs, target, weight, attr):
    """The loss of `log_probs` [N, C, d...] at the classes `target` [N, d...]."""
    log_probs = bb.normalize(log_probs)
    dtype = str(log_probs.ty.dtype)
    classes = log_probs.ty.shape.values[1]
    int64 = "int64"
    target = bb.normalize(relax.op.astype(target, int64))
    ignore_index = attr.get("ignore_index")
    ignored = (None if ignore_index is None else
               bb.normalize(relax.op.equal(target, relax.const(ignore_index, int64))))
    zero = relax.const(0.0, dtype)
    in_range = bb.normalize(relax.op.clip(target, 0, classes - 1))
    picked = relax.op.gather_elements(log_probs, relax.op.expand_dims(in_range, 1), axis=1)
    loss = relax.op.negative(relax.op.squeeze(picked, [1]))
    if ignored is not None:
        loss = relax.op.where(ignored, zero, loss)
    weights = None
    if weight is not None:
        weights = relax.op.take(weight, in_range, axis=0)
        if ignored is not None:
            weights = relax.op.where(ignored, zero, weights)
    elif ignored is not None:
        weights = relax.op.where(ignored, zero, relax.const(1.0, dtype))
    if weights is not None:
        weights = bb.normalize(weights)
        loss = relax.op.multiply(weights, loss)
    reduction = attr.get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction == "none":
        return loss
    if reduction == "sum":
        return relax.op.sum(loss)
    if reduction != "mean":
        raise ValueError(f"unknown loss reduction {reduction!r}; expected none, sum or mean")
    if weights is None:
        return relax.op.mean(loss)
    return relax.op.divide(relax.op.sum(loss), relax.op.sum(weights))


class NegativeLogLikelihoodLoss(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        return negative_log_likelihood(bb, inputs[0], inputs[1], optional_input(inputs, 2), attr)


class SoftmaxCrossEntropyLoss(tvm_onnx.OnnxOpConverter):
    """The second output, where asked for, is the log-probabilities."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        log_probs = bb.normalize(relax.op.nn.log_softmax(inputs[0], axis=1))
        loss = negative_log_likelihood(bb, log_probs, inputs[1], optional_input(inputs, 2), attr)
        if attr["tvm_custom"]["num_outputs"] == 2:
            return relax.Tuple([bb.normalize(loss), log_probs])
        return loss


CONVERTERS = {"NegativeLogLikelihoodLoss": NegativeLogLikelihoodLoss,
              "SoftmaxCrossEntropyLoss": SoftmaxCrossEntropyLoss}
