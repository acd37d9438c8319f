"""`relax.max` and `relax.min` of floats legalized with -inf and +inf as the identity.

TVM's reductions start from the dtype's lowest finite value, so the max of a row that is all
-inf (a fully masked attention row) comes out as -3.4e38, and a test `max == -inf`, which
exported attention graphs use to find such rows, never fires. numpy, PyTorch and ONNX give
-inf. Other types (integers, float8, which has no infinity) and reductions over an empty axis
keep TVM's legalization.
"""

from __future__ import annotations

import functools

from tvm import te, tirx, topi
from tvm.relax.transform.legalize_ops import statistical


def _reduction_axes(axis, ndim):
    if axis is None:
        return list(range(ndim))
    return sorted(int(a) + ndim if int(a) < 0 else int(a) for a in axis)


def _te_reduce(reducer, x, axis, keepdims):
    ndim = len(x.shape)
    axes = _reduction_axes(axis, ndim)
    reduce_axes = {d: te.reduce_axis((0, x.shape[d]), f"k{d}") for d in axes}
    out_shape = [1 if d in reduce_axes else x.shape[d] for d in range(ndim)
                 if keepdims or d not in reduce_axes]

    def compute(*index):
        index = iter(index)
        at = []
        for d in range(ndim):
            if d in reduce_axes:
                at.append(reduce_axes[d])
                if keepdims:
                    next(index)
            else:
                at.append(next(index))
        return reducer(x(*at), axis=list(reduce_axes.values()))

    return te.compute(out_shape, compute, name=f"{x.op.name}_red")


_MAX = te.comm_reducer(lambda a, b: tirx.Max(a, b), lambda dtype: tirx.const(float("-inf"), dtype),
                       name="max")
_MIN = te.comm_reducer(lambda a, b: tirx.Min(a, b), lambda dtype: tirx.const(float("inf"), dtype),
                       name="min")


_WITH_INFINITY = ("float16", "bfloat16", "float32", "float64")


def _legalize(reducer, topi_reduce):
    default = statistical._statistical(topi_reduce)

    def legalize(bb, call):
        if str(call.args[0].ty.dtype) not in _WITH_INFINITY or \
                statistical._has_const_zero_reduction_dim(call):
            return default(bb, call)
        return bb.call_te(functools.partial(_te_reduce, reducer), call.args[0], call.attrs.axis,
                          call.attrs.keepdims, primfunc_name_hint=call.op.name.split(".")[-1])

    return legalize


INFINITE_REDUCE_LEGALIZATIONS = {"relax.max": _legalize(_MAX, topi.max),
                                 "relax.min": _legalize(_MIN, topi.min)}
