"""What a frontend hands to the compiler: a Relax module with detached parameters and the
signature of each function."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from graft.runtime.signature import TensorSpec


@dataclass
class FunctionSignature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    params: list[str]  # names into ImportedModel.params, in the order the function takes them
    # EarlyExit: {"exits": [layer, ...]}; the compiled function then returns its exit's index
    # after the outputs (the runtime strips it and counts exits)
    early_exit: dict | None = None
    # inputs the model divides by (a Slice's steps, an integer Div's divisor), with why: the
    # runtime refuses a zero in them, which would end the process in the compiled code (SIGFPE)
    nonzero_inputs: dict | None = None

    def to_json(self) -> dict:
        out = {"inputs": [s.to_json() for s in self.inputs],
               "outputs": [s.to_json() for s in self.outputs],
               "params": list(self.params)}
        if self.early_exit is not None:
            out["early_exit"] = dict(self.early_exit)
        if self.nonzero_inputs:
            out["nonzero_inputs"] = dict(self.nonzero_inputs)
        return out


@dataclass
class ImportedModel:
    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    signatures: dict[str, FunctionSignature]
    source: dict = field(default_factory=dict)  # what was imported, for the manifest
    example_inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    extra_files: dict[str, bytes] = field(default_factory=dict)  # written into the artifact
    held_out: dict = field(default_factory=dict)  # data the compile checks its result on


def dim_text(dim, renames: dict[str, str]) -> int | str:
    """A Relax shape dim as a signature dim: an int, or the name of a symbolic dim."""
    if isinstance(dim, (int, tvm.tirx.IntImm)):
        return int(dim)
    if isinstance(dim, tvm.tirx.Var):
        return renames.get(dim.name, dim.name)
    text = str(dim)
    for old, new in renames.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return text


def struct_info_specs(sinfo, names: list[str], renames: dict[str, str]) -> list[TensorSpec]:
    """Flatten a (tuple of) tensor struct info into specs, naming them from `names`."""
    leaves = []

    def walk(si):
        if isinstance(si, relax.TupleType):
            for field_si in si.fields:
                walk(field_si)
        else:
            leaves.append(si)

    walk(sinfo)
    specs = []
    for i, si in enumerate(leaves):
        name = names[i] if i < len(names) else f"output{i}"
        if isinstance(si, relax.TensorType) and si.shape is not None \
                and isinstance(si.shape, relax.ShapeExpr):
            shape = [dim_text(d, renames) for d in si.shape.values]
            specs.append(TensorSpec(name, shape, str(si.dtype)))
        elif isinstance(si, relax.TensorType):
            specs.append(TensorSpec(name, ["?"] * max(si.ndim, 0), str(si.dtype)))
        else:
            specs.append(TensorSpec(name, [], str(si)))
    return specs


def detach(mod: tvm.IRModule, input_names: dict[str, list[str]], output_names: dict[str, list[str]],
           renames: dict[str, str] | None = None) -> tuple[tvm.IRModule, dict, dict]:
    """Detach parameters (`relax.frontend.detach_params`) and name them; build signatures.

    Parameters are named by their Relax variable names. Equal arrays are stored once: tied
    weights (an LM head sharing the embedding) and a parameter several functions take.
    """
    renames = renames or {}
    mod, detached = relax.frontend.detach_params(mod)
    params: dict[str, np.ndarray] = {}
    by_content: dict[tuple, str] = {}
    signatures = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        name = gv.name_hint
        num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs \
            else len(func.params)
        values = detached.get(name, [])
        param_vars = list(func.params[num_input:])
        assert len(param_vars) == len(values), (name, len(param_vars), len(values))
        param_names = []
        for var, value in zip(param_vars, values):
            array = value.numpy()
            key = (array.shape, str(array.dtype),
                   hashlib.blake2b(array.tobytes(), digest_size=16).digest())
            if key in by_content:
                param_names.append(by_content[key])
                continue
            pname = var.name
            suffix = 1
            while pname in params:
                pname, suffix = f"{var.name}_{suffix}", suffix + 1
            params[pname] = array
            by_content[key] = pname
            param_names.append(pname)
        inputs = struct_info_specs(
            relax.TupleType([v.ty for v in func.params[:num_input]]),
            input_names.get(name) or [v.name for v in func.params[:num_input]], renames)
        outputs = struct_info_specs(func.ret_ty, output_names.get(name, []), renames)
        signatures[name] = FunctionSignature(inputs, outputs, param_names)
    return mod, params, signatures
