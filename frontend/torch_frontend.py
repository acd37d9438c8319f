"""torch.export → Relax: an nn.Module with example inputs, an ExportedProgram, or a .pt2 file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graft.frontend.imported import ImportedModel, detach
from graft.runtime.errors import GraftError, ModelLoadError, UnsupportedOperatorError

HOW_TO_ADD_A_CONVERTER = (
    "Supply a converter with graft.compile(..., converters={'<op name>': fn}), where fn(node, "
    "importer) returns a relax.Expr (TVM's custom_convert_map; see README, 'Unsupported "
    "operators')")


def load_exported_program(path: str | os.PathLike):
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    try:
        return torch.export.load(str(path))
    except Exception as err:  # torch raises many types for a corrupt archive
        raise ModelLoadError(f"{str(path)!r} is not a readable torch.export archive (.pt2): "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                             ) from None


def export_module(module, example_inputs, dynamic_shapes=None):
    """torch.export a module, passing example inputs as a tuple (or a dict of keyword inputs)."""
    import torch

    module = module.eval()
    args, kwargs = (), {}
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
    elif example_inputs is not None:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
            else (example_inputs,)
    args = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in args)
    kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            return torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_shapes)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GraftError(f"torch.export failed on {type(module).__name__}: {first}") from err


def import_exported_program(ep, *, converters=None, function_name: str = "main",
                            dynamic_shapes=None) -> ImportedModel:
    """Import an ExportedProgram into a Relax module with detached parameters."""
    from tvm.relax.frontend.torch import from_exported_program

    from graft.frontend.derived_dims import DerivedInputDims
    from graft.frontend.inbound_slice import InboundStridedSlice
    from graft.frontend.negative_index import NegativeIndexTake

    from graft.frontend.torch_converters import CONVERTERS

    converters = {**CONVERTERS, **(converters or {})}
    if unsupported_ops(ep, converters):
        # Only where some op has no converter as written: the retrace is slow (40 s on a
        # 135M-parameter LM) and turns attention into a longer, slower graph.
        ep = ep.run_decompositions()
        check_supported(ep, converters)
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                custom_convert_map=converters)
    mod = NegativeIndexTake()(InboundStridedSlice()(DerivedInputDims()(mod)))
    if function_name != "main":
        mod = _rename_main(mod, function_name)
    input_names = [spec.arg.name for spec in ep.graph_signature.input_specs
                   if spec.kind.name == "USER_INPUT"]
    renames = _symbol_names(ep, dynamic_shapes, input_names)
    mod, params, signatures = detach(mod, {function_name: input_names},
                                     {function_name: output_names(ep)}, renames)
    return ImportedModel(mod, params, signatures, source={"frontend": "torch.export"})


def unsupported_ops(ep, converters) -> dict[str, list[str]]:
    """Ops in the graph that neither TVM nor `converters` convert, with the nodes using them."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().create_convert_map()) | set(converters or ())
    missing: dict[str, list[str]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in known:
            missing.setdefault(name, []).append(node.name)
    return missing


def check_supported(ep, converters) -> None:
    """Name every unsupported op and its node at once (TVM asserts on the first set it finds)."""
    missing = unsupported_ops(ep, converters)
    if missing:
        raise UnsupportedOperatorError(missing, HOW_TO_ADD_A_CONVERTER)


def output_names(ep) -> list[str]:
    """Names of the flattened outputs from the output pytree: dict keys, tuple indices."""
    names: list[str] = []

    def walk(spec, prefix):
        children = spec.children() if hasattr(spec, "children") else spec.children_specs
        if spec.num_leaves == 1 and not children:
            names.append(prefix or "output")
            return
        keys = spec.context if isinstance(spec.context, (list, tuple)) else None
        for i, child in enumerate(children):
            key = str(keys[i]) if keys is not None and i < len(keys) else str(i)
            walk(child, f"{prefix}.{key}" if prefix else key)

    walk(ep.call_spec.out_spec, "")
    if len(names) == 1 and names[0] == "0":
        names = ["output"]
    return names


def _symbol_names(ep, dynamic_shapes, input_names) -> dict[str, str]:
    """Map torch's symbols (s0, s77) to the names of the user's Dim objects, where named."""
    import torch

    if not dynamic_shapes:
        return {}
    if isinstance(dynamic_shapes, dict):
        per_input = [dynamic_shapes.get(n) for n in input_names]
    else:
        per_input = list(dynamic_shapes)
    renames = {}
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name, dims in zip(input_names, per_input):
        node = placeholders.get(name)
        if node is None or dims is None or "val" not in node.meta:
            continue
        items = dims.items() if isinstance(dims, dict) else enumerate(dims)
        for axis, dim in items:
            dim_name = getattr(dim, "__name__", None)
            if dim is None or not dim_name or dim_name.startswith("Dim.") or dim_name in (
                    "DYNAMIC", "AUTO", "STATIC"):
                continue
            size = node.meta["val"].shape[axis]
            if isinstance(size, torch.SymInt):
                renames[str(size.node.expr)] = dim_name
    return renames


def _rename_main(mod, new_name):
    import tvm

    func = mod["main"].with_attr("global_symbol", new_name)
    return tvm.IRModule({tvm.ir.GlobalVar(new_name): func})
