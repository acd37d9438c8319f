"""ai.onnx.preview.FlexAttention written out as standard ONNX nodes before TVM imports it.

FlexAttention carries its score and probability modifiers as subgraphs (`score_mod`, applied
to the [B, H, L, S] scores before the softmax; `prob_mod`, to the probabilities after it).
Each FlexAttention node whose Q and K shapes are static becomes, as onnx.reference computes
it: sqrt(scale) multiplied into Q and K (K and V heads repeated for grouped queries), Q.K^T cast
to the softmax type (softmax_precision, else float32 for 16-bit inputs), the score_mod body
inlined, Softmax, the prob_mod body inlined, and the product with V cast back to V's type.
"""

from __future__ import annotations

import numpy as np


def expand_flex_attention(model, static_shapes: dict[str, list[int]]):
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    types = {i.name: i.type.tensor_type.elem_type
             for i in list(graph.input) + list(graph.value_info) + list(graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    nodes, constants = [], []

    def constant(name, value):
        constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def inline(body, value, tag):
        names = {body.input[0].name: value}
        for init in body.initializer:
            names[init.name] = constant(f"{tag}_{init.name}", numpy_helper.to_array(init))
        for inner in body.node:
            copy = helper.make_node(inner.op_type, [names.get(i, i) for i in inner.input], [],
                                    domain=inner.domain)
            copy.attribute.extend(inner.attribute)
            for out in inner.output:
                names[out] = f"{tag}_{out}" if out else ""
            copy.output.extend(names[o] for o in inner.output)
            nodes.append(copy)
        return names[body.output[0].name]

    for index, node in enumerate(graph.node):
        query, key, value = (list(node.input) + ["", "", ""])[:3]
        q_shape, k_shape = static_shapes.get(query), static_shapes.get(key)
        if (node.op_type != "FlexAttention" or node.domain != "ai.onnx.preview"
                or q_shape is None or k_shape is None or query not in types):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        tag = f"flex{index}"
        dtype = helper.tensor_dtype_to_np_dtype(types[query])
        scale = attrs.get("scale") or 1.0 / np.sqrt(q_shape[3])
        root = constant(f"{tag}_root_scale", np.asarray(np.sqrt(np.float32(scale)), dtype))
        heads, kv_heads = q_shape[1], k_shape[1]
        if heads != kv_heads:  # each key/value head repeated in place for its query group
            repeated = []
            for name in (key, value):
                shape = static_shapes.get(name)
                if shape is None:
                    break
                wide = [shape[0], kv_heads, heads // kv_heads] + shape[2:]
                nodes += [helper.make_node("Unsqueeze", [name, constant(f"{tag}_{name}_axis",
                                                                        np.array([2]))],
                                           [f"{tag}_{name}_1"]),
                          helper.make_node("Expand", [f"{tag}_{name}_1", constant(
                              f"{tag}_{name}_wide", np.array(wide))], [f"{tag}_{name}_2"]),
                          helper.make_node("Reshape", [f"{tag}_{name}_2", constant(
                              f"{tag}_{name}_shape", np.array([shape[0], heads] + shape[2:]))],
                                           [f"{tag}_{name}_grouped"])]
                repeated.append(f"{tag}_{name}_grouped")
            if len(repeated) != 2:
                nodes.append(node)
                continue
            key, value = repeated
        if attrs.get("softmax_precision"):
            compute = attrs["softmax_precision"]
        elif types[query] in (TensorProto.FLOAT16, TensorProto.BFLOAT16) or dtype.itemsize < 4:
            compute = TensorProto.FLOAT
        else:
            compute = types[query]
        nodes += [helper.make_node("Mul", [query, root], [f"{tag}_q"]),
                  helper.make_node("Mul", [key, root], [f"{tag}_k"]),
                  helper.make_node("Transpose", [f"{tag}_k"], [f"{tag}_kt"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [f"{tag}_q", f"{tag}_kt"], [f"{tag}_raw"]),
                  helper.make_node("Cast", [f"{tag}_raw"], [f"{tag}_scores"], to=compute)]
        scores = f"{tag}_scores"
        if "score_mod" in attrs:
            scores = inline(attrs["score_mod"], scores, f"{tag}_score_mod")
        nodes.append(helper.make_node("Softmax", [scores], [f"{tag}_probs"], axis=-1))
        probs = f"{tag}_probs"
        if "prob_mod" in attrs:
            probs = inline(attrs["prob_mod"], probs, f"{tag}_prob_mod")
        value_type = types.get(node.input[2], types[query])
        nodes += [helper.make_node("Cast", [value], [f"{tag}_v"], to=compute),
                  helper.make_node("MatMul", [probs, f"{tag}_v"], [f"{tag}_out"]),
                  helper.make_node("Cast", [f"{tag}_out"], [node.output[0]], to=value_type)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    return model
