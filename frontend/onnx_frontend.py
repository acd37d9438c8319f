"""ONNX → Relax: a path or an onnx.ModelProto, with optional input specs."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

from graft.frontend.imported import ImportedModel, detach
from graft.runtime.errors import GraftError, InputSpecError, ModelLoadError, \
    UnsupportedOperatorError
from graft.runtime.signature import TensorSpec, parse_spec

HOW_TO_ADD_A_CONVERTER = (
    "Supply a converter with graft.compile(..., converters={'<OpType>': fn}), where "
    "fn(bb, inputs, attrs) returns a relax.Expr (see README, 'Unsupported operators')")

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
                9: "bool", 10: "float16", 11: "float64", 16: "bfloat16"}

_convert_map_lock = threading.Lock()


def load_onnx(model):
    """Read and check an ONNX model; errors name the file and what is wrong with it."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        where = "the ONNX model"
    else:
        path = Path(model)
        where = repr(str(path))
        if not path.is_file():
            raise ModelLoadError(f"model file {where} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as err:
            raise ModelLoadError(f"{where} is not a readable ONNX model (truncated or corrupt?): "
                                 f"{type(err).__name__}: {_first_line(err)}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{where} holds no graph: empty, truncated or not an ONNX file")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ModelLoadError(f"{where} fails onnx.checker: {_first_line(err)}") from None
    _check_omitted_inputs(model, where)
    _check_output_counts(model, where)
    _check_initializers(model, where)
    return model


def _check_output_counts(model, where: str) -> None:
    """Split's num_outputs must match its outputs: onnx's own shape inference (which TVM's
    importer runs) aborts the process on a mismatch."""
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
            continue
        count = next((a.i for a in node.attribute if a.name == "num_outputs"), None)
        if count is not None and count != len(node.output):
            label = f"Split {node.name!r}" if node.name else "Split"
            raise ModelLoadError(f"{where}: node #{index} ({label}) has num_outputs={count} but "
                                 f"{len(node.output)} outputs")


def _check_initializers(model, where: str) -> None:
    """Each weight's data must fill its dims (the checker does not look at the data)."""
    import onnx
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue  # read, and checked, when the model is loaded with its data
        try:
            numpy_helper.to_array(init)  # a view of raw_data: no copy of the weights
        except Exception as err:  # noqa: BLE001 - numpy and onnx raise several types
            raise ModelLoadError(f"{where}: initializer {init.name!r} (dims {list(init.dims)}, "
                                 f"ONNX type {init.data_type}) holds data that does not fit "
                                 f"them: {type(err).__name__}: {_first_line(err)}") from None


def _check_omitted_inputs(model, where: str) -> None:
    """An input named "" is omitted, which ONNX allows for optional inputs only; the checker
    lets it through everywhere, and TVM's importer then crashes on the missing value."""
    import onnx

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or "" not in node.input:
            continue
        try:
            formal = onnx.defs.get_schema(node.op_type, opset).inputs
        except Exception:  # noqa: BLE001 - the checker has vouched for the op; nothing to add
            continue
        for position, name in enumerate(node.input):
            if name or not formal:
                continue
            param = formal[min(position, len(formal) - 1)]
            if param.option != onnx.defs.OpSchema.FormalParameterOption.Optional:
                label = f"{node.op_type} {node.name!r}" if node.name else node.op_type
                raise ModelLoadError(f"{where}: node #{index} ({label}) omits its input "
                                     f"{position} ({param.name!r}), which {node.op_type} "
                                     "requires; only optional inputs may be left empty")


def input_specs_of(model, specs: list | None) -> list[TensorSpec]:
    """The graph inputs (initializers excluded), overridden by user specs by name."""
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    given = {}
    for spec in specs or []:
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        given[spec.name] = spec
    names = [i.name for i in graph_inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputSpecError(f"input spec names {', '.join(map(repr, unknown))}, which the model "
                             f"does not have; its inputs are {', '.join(names)}")
    result = []
    for info in graph_inputs:
        if info.name in given:
            result.append(given[info.name])
            continue
        tensor_type = info.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise InputSpecError(f"input {info.name!r} has ONNX element type "
                                 f"{tensor_type.elem_type}, which graft does not take")
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.dim_param:
                shape.append(_dim_name(dim.dim_param))
            else:
                raise InputSpecError(
                    f"input {info.name!r} dim {axis} has no size or name: give it with --input "
                    f"{info.name}:SHAPE:{dtype}")
        result.append(TensorSpec(info.name, shape, dtype))
    for spec in result:
        _check_size(spec)
    return result


MAX_INPUT_ELEMENTS = 1 << 34  # 64 GiB of float32: more than a corrupt shape, less than absurd


def _check_size(spec: TensorSpec) -> None:
    static = [d for d in spec.shape if isinstance(d, int)]
    if any(d < 0 for d in static):
        raise InputSpecError(f"input {spec.name!r} has shape {spec.shape_text()}: sizes must not "
                             "be negative (a dim of unknown size needs a name)")
    elements = 1
    for d in static:
        elements *= d
    if elements > MAX_INPUT_ELEMENTS:
        raise InputSpecError(f"input {spec.name!r} has shape {spec.shape_text()}: {elements:,} "
                             f"elements, more than the {MAX_INPUT_ELEMENTS:,} graft takes (a "
                             "corrupt shape? give the real one with --input)")


def import_onnx(model, input_specs=None, *, converters=None) -> ImportedModel:
    from tvm import tirx
    from tvm.relax.frontend.onnx import from_onnx

    from graft.frontend import onnx_fixes

    model = load_onnx(model)
    specs = input_specs_of(model, input_specs)
    model = onnx_fixes.apply(model, specs)
    check_supported(model, converters)
    dim_vars: dict[str, tirx.Var] = {}
    shape_dict = {s.name: [d if isinstance(d, int) else dim_vars.setdefault(d, tirx.Var(d, "int64"))
                           for d in s.shape] for s in specs}
    dtype_dict = {s.name: s.dtype for s in specs}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    printed = io.StringIO()
    try:
        with _extra_converters(converters), contextlib.redirect_stdout(printed):
            mod = from_onnx(model, shape_dict, dtype_dict, opset=opset, keep_params_in_input=True,
                            sanitize_input_names=False)
    except GraftError:
        raise
    except Exception as err:
        where = printed.getvalue().strip().splitlines()
        context = f" ({where[-1].split(', with inputs')[0]})" if where else ""
        raise GraftError(f"ONNX import failed{context}: {type(err).__name__}: "
                         f"{_first_line(err)}") from err
    mod = _shape_outputs_as_tensors(mod)
    input_names = [s.name for s in specs]
    output_names = [o.name for o in model.graph.output]
    mod, params, signatures = detach(mod, {"main": input_names}, {"main": output_names})
    sig = signatures["main"]
    for spec, given in zip(sig.inputs, specs):  # keep the user's dim names and dtypes
        spec.shape, spec.dtype = list(given.shape), given.dtype
    sig.nonzero_inputs = _divisor_inputs(model, specs) or None
    return ImportedModel(mod, params, signatures, source={"frontend": "onnx", "opset": opset,
                                                          "ir_version": model.ir_version})


def _shape_outputs_as_tensors(mod):
    """A graph output computed by Shape imports as a Relax shape value, which an artifact's
    signature cannot hold: return it as the int64 tensor ONNX says it is."""
    from tvm import relax

    func = mod["main"]
    seq = func.body
    result = seq.body
    is_tuple = isinstance(result.ty, relax.TupleType)
    types = list(result.ty.fields) if is_tuple else [result.ty]
    if not any(isinstance(t, relax.ShapeType) for t in types):
        return mod
    builder = relax.BlockBuilder()
    bindings, converted, fields = [], [], [result]
    if is_tuple:
        fields = [relax.Var(f"output{i}", t) for i, t in enumerate(types)]
        bindings = [relax.VarBinding(v, relax.TupleGetItem(result, i))
                    for i, v in enumerate(fields)]
    for index, field in enumerate(fields):
        if isinstance(field.ty, relax.ShapeType):
            value = builder.normalize(relax.op.shape_to_tensor(field))
            var = relax.Var(f"shape_output{index}", value.ty)
            bindings.append(relax.VarBinding(var, value))
            field = var
        converted.append(field)
    body = relax.Tuple(converted) if is_tuple else converted[0]
    ret_ty = relax.TupleType([f.ty for f in converted]) if is_tuple else converted[0].ty
    mod = mod.clone()
    mod["main"] = relax.Function(func.params,
                                 relax.SeqExpr([*seq.blocks, relax.BindingBlock(bindings)], body),
                                 ret_ty, func.is_pure, func.attrs, func.span)
    return relax.transform.Normalize()(mod)


def _divisor_inputs(model, specs: list[TensorSpec]) -> dict[str, str]:
    """Graph inputs that the model divides by as they are: a Slice's steps, the divisor of an
    integer Div or Mod. {input name: the node that divides by it}."""
    integer = {s.name for s in specs if s.dtype.startswith(("int", "uint"))}
    found = {}
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        position = {"Slice": 4, "Div": 1, "Mod": 1}.get(node.op_type)
        if position is None or len(node.input) <= position:
            continue
        name = node.input[position]
        if name in integer:
            role = "steps" if node.op_type == "Slice" else "divisor"
            found.setdefault(name, f"the {role} of node #{index} ({node.op_type})")
    return found


def op_key(node) -> str:
    """An op's name as converters are keyed: `Relu`, or `com.example.FancyOp` outside ai.onnx."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def check_supported(model, converters) -> None:
    from tvm.relax.frontend.onnx import onnx_frontend

    from graft.frontend.onnx_converters import CONVERTERS

    known = (set(onnx_frontend._get_convert_map()) | set(CONVERTERS) | {"If", "Constant"}
             | {f"graft.{op}" for op in CONVERTERS}  # ops onnx_fixes writes
             | set(converters or ()))
    missing: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        if op_key(node) not in known:
            missing.setdefault(op_key(node), []).append(node.name or f"node #{index}")
    if missing:
        raise UnsupportedOperatorError(missing, HOW_TO_ADD_A_CONVERTER)


@contextlib.contextmanager
def _extra_converters(converters):
    """Make graft's and the user's converters visible to TVM's importer for one import (it
    has no custom_convert_map for ONNX, and looks converters up by op type alone)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from graft.frontend.onnx_converters import CONVERTERS

    class_map = {op.rsplit(".", 1)[-1]: converter for op, converter in CONVERTERS.items()}
    for op, fn in (converters or {}).items():
        class_map[op.rsplit(".", 1)[-1]] = _converter_class(op, fn)
    with _convert_map_lock:
        original = onnx_frontend._get_convert_map
        onnx_frontend._get_convert_map = lambda: {**original(), **class_map}
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = original


def _converter_class(op_type, fn):
    class UserConverter:
        @classmethod
        def get_converter(cls, opset):
            return lambda bb, inputs, attrs, params: fn(bb, list(inputs), attrs)

    UserConverter.__name__ = f"UserConverter_{op_type}"
    return UserConverter


def _dim_name(param: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in param)
    return name if name and not name[0].isdigit() else f"d_{name}"


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def save_for_onnxruntime(model, path: str | os.PathLike) -> None:
    """Write a model onnxruntime accepts (onnx 1.23 helpers write IR 14; ORT 1.31 reads <= 11)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(path))
