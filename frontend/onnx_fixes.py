"""Cleanups of an ONNX graph before TVM imports it.

TVM's ONNX importer handles constants well only when they are initializers or Constant nodes it
can see directly. Real exports compute many constants at run time (ConstantOfShape of a constant
shape, Shape of a statically shaped tensor, arithmetic on those), and some of those patterns
break the importer (a rank-0 ConstantOfShape becomes broadcast_to(x, R.shape([]))). Here:

1. ONNX shape inference with data propagation, so value shapes are known; a Scan of static
   length is unrolled (onnx_scan.py) and FlexAttention written out (onnx_flex_attention.py);
2. `Shape` of a tensor whose shape is fully static becomes a constant;
3. every node whose inputs are all constants is evaluated (onnx.reference) and replaced by a
   Constant, to a fixed point; Constants written with value_float(s)/value_int(s)/... become
   `value` tensors. Weights are never touched (only small outputs are folded), and
   `Shape` of a tensor with symbolic dims is kept, so symbolic dims stay symbolic;
4. Constants inside subgraphs (If branches) given as value_float(s)/value_int(s) become
   `value` tensors too;
5. a `Shape` that feeds an op TVM's importer cannot give a shape value to (Max, Sub, Div of
   shapes: the expanded form of CenterCropPad) becomes graft's `ShapeAsTensor`, an int64 tensor,
   and a MaxPool that asks for its indices output becomes graft's `MaxPoolWithIndices`.
"""

from __future__ import annotations

import numpy as np

from graft.frontend import onnx_flex_attention, onnx_scan

MAX_FOLDED_ELEMENTS = 1 << 16
_NOT_FOLDED = {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike", "Multinomial", "Bernoulli"}


def apply(model, specs=None):
    model = _with_input_shapes(model, specs)
    model = _inferred(model)
    if any(node.op_type == "Scan" for node in model.graph.node):
        model = _inferred(onnx_scan.unroll_scans(_copy(model), _static_shapes(model.graph)))
    if any(node.op_type == "FlexAttention" for node in model.graph.node):
        model = _inferred(onnx_flex_attention.expand_flex_attention(
            _copy(model), _static_shapes(model.graph)))
    model = _fold_static_shapes(model)
    return _ops_for_graft_converters(_plain_constants_in_subgraphs(_fold_constants(model)))


def _inferred(model):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a help, not a requirement
        return model


def _with_input_shapes(model, specs):
    """Write the user's input specs into the graph so inference sees the same shapes."""
    import onnx

    if not specs:
        return model
    by_name = {s.name: s for s in specs}
    model = _copy(model)
    for info in model.graph.input:
        spec = by_name.get(info.name)
        if spec is None:
            continue
        dims = info.type.tensor_type.shape.dim
        del dims[:]
        for d in spec.shape:
            dim = dims.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d
        info.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(spec.dtype)) if spec.dtype != "bfloat16" else onnx.TensorProto.BFLOAT16
    return model


def _copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _static_shapes(graph) -> dict[str, list[int]]:
    shapes = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            if all(d is not None for d in dims):
                shapes[info.name] = dims
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _fold_static_shapes(model):
    from onnx import helper, numpy_helper

    model = _copy(model)
    shapes = _static_shapes(model.graph)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0] in shapes:
            shape = np.array(shapes[node.input[0]], np.int64)
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            value = numpy_helper.from_array(shape[start:end], node.output[0])
            nodes.append(helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                          value=value))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _fold_constants(model):
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = _copy(model)
    graph = model.graph
    opsets = list(model.opset_import)
    changed = True
    while changed:
        changed = False
        values = _constants(graph)
        nodes = []
        for node in graph.node:
            # a Constant given as value_float(s)/value_int(s)/... becomes a `value` tensor,
            # the only form TVM's importer reads
            plain_constant = node.op_type == "Constant" and node.attribute and \
                node.attribute[0].name == "value"
            foldable = ((node.op_type not in _NOT_FOLDED or
                         (node.op_type == "Constant" and not plain_constant))
                        and node.domain in ("", "ai.onnx")
                        and len(node.output) == 1 and not _has_subgraph(node)
                        and all(name == "" or name in values for name in node.input))
            if foldable:
                inputs = [numpy_helper.from_array(np.asarray(values[name]), name)
                          for name in dict.fromkeys(node.input) if name]
                sub = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(
                    node.output[0], onnx.TensorProto.UNDEFINED, None)], initializer=inputs)
                try:
                    evaluator = ReferenceEvaluator(helper.make_model(
                        sub, opset_imports=opsets, ir_version=min(model.ir_version, 10)))
                    result = np.asarray(evaluator.run(None, {})[0])
                except Exception:  # the reference evaluator lacks it or rejects it: keep it
                    result = None
                if result is not None and result.dtype != object and (
                        result.size <= MAX_FOLDED_ELEMENTS or node.op_type == "Constant"):
                    nodes.append(helper.make_node(
                        "Constant", [], [node.output[0]], name=node.name,
                        value=numpy_helper.from_array(result, node.output[0])))
                    changed = True
                    continue
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return model


def _has_subgraph(node) -> bool:
    return any(a.type in (5, 10) for a in node.attribute)  # GRAPH, GRAPHS


# the ops TVM's importer lets take a shape value (onnx_frontend's shape_compatible_ops)
SHAPE_VALUE_OPS = {"Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand",
                   "Concat", "Equal", "Where", "Cast", "CastLike", "Squeeze"}


def _ops_for_graft_converters(model):
    from onnx import helper

    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    outputs = {o.name for o in model.graph.output}
    changed = False
    for node in model.graph.node:
        if (node.op_type == "Shape" and node.domain in ("", "ai.onnx")
                and consumers.get(node.output[0], set()) - SHAPE_VALUE_OPS
                and node.output[0] not in outputs):
            node.op_type, node.domain = "ShapeAsTensor", "graft"
            changed = True
        elif (node.op_type == "MaxPool" and node.domain in ("", "ai.onnx")
              and len(node.output) == 2 and node.output[1]):
            node.op_type, node.domain = "MaxPoolWithIndices", "graft"
            changed = True
    if changed and not any(o.domain == "graft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("graft", 1))
    return model


_PLAIN_CONSTANT_TYPES = {"value_float": np.float32, "value_floats": np.float32,
                         "value_int": np.int64, "value_ints": np.int64}


def _plain_constants_in_subgraphs(model):
    from onnx import helper, numpy_helper

    def visit(graph, inside):
        for node in graph.node:
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.type == 5 else
                            list(attribute.graphs) if attribute.type == 10 else []):
                    visit(sub, True)
            if not (inside and node.op_type == "Constant" and len(node.attribute) == 1):
                continue
            attribute = node.attribute[0]
            dtype = _PLAIN_CONSTANT_TYPES.get(attribute.name)
            if dtype is None:
                continue
            value = np.asarray(helper.get_attribute_value(attribute), dtype)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute(
                "value", numpy_helper.from_array(value, node.output[0])))

    if any(_has_subgraph(node) for node in model.graph.node):
        visit(model.graph, False)
    return model
