"""Scan (opset 9 and later) unrolled into the graph before TVM imports it.

TVM's importer has no Scan. When the scan length is static (the scanned inputs' shapes are
known) and at most MAX_STEPS, each step becomes a copy of the body with its values renamed:
the scanned inputs are read one slice at a time (Gather of one index, in either direction),
the state flows from one copy to the next, and each scan output is the steps' values stacked
along its axis (Unsqueeze and Concat, reversed for a reverse direction). A Scan that does not
qualify (a run-time length, a body with its own subgraphs) is left for the unsupported-operator
error to name.
"""

from __future__ import annotations

import numpy as np

MAX_STEPS = 256


def unroll_scans(model, static_shapes: dict[str, list[int]]):
    from onnx import helper, numpy_helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    if opset < 9 or not any(n.op_type == "Scan" for n in model.graph.node):
        return model
    nodes, constants = [], []

    def constant(name, value):
        constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for index, node in enumerate(model.graph.node):
        steps = _static_length(node, static_shapes) if node.op_type == "Scan" else None
        if steps is None:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        body = attrs["body"]
        scanned = attrs["num_scan_inputs"]
        states = len(node.input) - scanned
        in_axes = list(attrs.get("scan_input_axes", [0] * scanned))
        in_reverse = list(attrs.get("scan_input_directions", [0] * scanned))
        outputs = len(body.output) - states
        out_axes = list(attrs.get("scan_output_axes", [0] * outputs))
        out_reverse = list(attrs.get("scan_output_directions", [0] * outputs))
        tag = f"scan{index}"
        state = list(node.input[:states])
        per_step = [[] for _ in range(outputs)]
        for step in range(steps):
            names = {}
            for formal, actual in zip(body.input[:states], state):
                names[formal.name] = actual
            for j, formal in enumerate(body.input[states:]):
                position = steps - 1 - step if in_reverse[j] else step
                sliced = f"{tag}_t{step}_{formal.name}"
                nodes.append(helper.make_node(
                    "Gather", [node.input[states + j],
                               constant(f"{sliced}_index", np.int64(position))],
                    [sliced], axis=in_axes[j]))
                names[formal.name] = sliced
            for init in body.initializer:
                renamed = numpy_helper.from_array(numpy_helper.to_array(init),
                                                  f"{tag}_t{step}_{init.name}")
                constants.append(renamed)
                names[init.name] = renamed.name
            for inner in body.node:
                copy = helper.make_node(inner.op_type, [names.get(i, i) for i in inner.input],
                                        [], domain=inner.domain)
                copy.attribute.extend(inner.attribute)
                for out in inner.output:
                    names[out] = f"{tag}_t{step}_{out}" if out else ""
                copy.output.extend(names[o] if o else "" for o in inner.output)
                nodes.append(copy)
            results = [names.get(o.name, o.name) for o in body.output]
            state = results[:states]
            for k, value in enumerate(results[states:]):
                per_step[k].append(value)
        for final, value in zip(node.output[:states], state):
            nodes.append(helper.make_node("Identity", [value], [final]))
        for k, name in enumerate(node.output[states:]):
            if not name:
                continue
            values = per_step[k][::-1] if out_reverse[k] else per_step[k]
            axis = out_axes[k]
            rank = _rank(body.output[states + k]) + 1
            axis = axis + rank if axis < 0 else axis
            stacked = []
            for step, value in enumerate(values):
                target = f"{tag}_{name}_{step}"
                if opset >= 13:
                    nodes.append(helper.make_node(
                        "Unsqueeze", [value, constant(f"{target}_axes", np.array([axis]))],
                        [target]))
                else:
                    nodes.append(helper.make_node("Unsqueeze", [value], [target], axes=[axis]))
                stacked.append(target)
            nodes.append(helper.make_node("Concat", stacked, [name], axis=axis))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(constants)
    return model


def _static_length(node, static_shapes) -> int | None:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if any(a.type in (5, 10) for n in attrs["body"].node for a in n.attribute):
        return None  # a body with subgraphs of its own: not unrolled
    scanned = attrs["num_scan_inputs"]
    axes = list(attrs.get("scan_input_axes", [0] * scanned))
    lengths = set()
    for name, axis in zip(node.input[len(node.input) - scanned:], axes):
        shape = static_shapes.get(name)
        if shape is None:
            return None
        lengths.add(shape[axis])
    if len(lengths) != 1:
        return None
    steps = lengths.pop()
    return steps if 0 < steps <= MAX_STEPS else None


def _rank(info) -> int:
    return len(info.type.tensor_type.shape.dim)
