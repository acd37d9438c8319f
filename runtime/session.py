"""Loading an artifact and running its functions with checked inputs."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from graft.runtime.artifact import LIBRARY, PARAMS, read_manifest, read_safetensors
from graft.runtime.errors import ArtifactError, ExecutionError, RuntimeInputError
from graft.runtime.signature import OBJECT, TensorSpec

_threads_configured = False


def configure_threads(num_threads: int | None = None) -> int:
    """Use every visible core (TVM's pool defaults to half of them on x86).

    GRAFT_NUM_THREADS (or TVM_NUM_THREADS) overrides the count. TVM reads TVM_NUM_THREADS when
    its pool starts; `runtime.config_threadpool` alone does not raise the count past that.
    """
    global _threads_configured
    if num_threads is None:
        env = os.environ.get("GRAFT_NUM_THREADS") or os.environ.get("TVM_NUM_THREADS")
        num_threads = int(env) if env else len(os.sched_getaffinity(0))
    os.environ["TVM_NUM_THREADS"] = str(num_threads)
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(0, num_threads)
    _threads_configured = True
    return num_threads


def num_threads() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())


def device_for(kind: str):
    if kind == "cpu":
        return tvm.cpu(0)
    if kind == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise ArtifactError("this artifact was built for CUDA, but no CUDA GPU is visible "
                                "here: compile with --target cpu to run on this machine")
        return dev
    raise ArtifactError(f"unknown device kind {kind!r} in the manifest (expected cpu or cuda)")


_loaded_libraries: dict[str, tuple] = {}   # real path -> the file's identity when loaded


def load_library(path: Path):
    """The compiled module at `path`. dlopen hands back the library it already loaded from a
    path, even when that file has since been replaced (an artifact compiled again into the same
    directory): a replaced file is loaded from a private copy instead."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if _loaded_libraries.setdefault(real, identity) == identity:
        return tvm.runtime.load_module(real)
    fd, copy = tempfile.mkstemp(prefix="graft-model-", suffix=".so")
    os.close(fd)
    try:
        shutil.copyfile(real, copy)
        return tvm.runtime.load_module(copy)
    finally:
        os.unlink(copy)


class Artifact:
    """A loaded, verified artifact: its manifest, library and parameters (bound once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.device = device_for(self.manifest.get("device", "cpu"))
        if not _threads_configured and self.device.dlpack_device_type() == 1:
            configure_threads()
        try:
            self.library = load_library(self.path / LIBRARY)
        except Exception as err:  # TVM raises its own error types
            raise ArtifactError(f"could not load {LIBRARY} from {str(self.path)!r}: {err}") from None
        self.params = read_safetensors(
            self.path / PARAMS,
            copy=lambda array: tvm.runtime.tensor(np.asarray(array, order="C"), self.device))
        for name, sig in self.manifest["functions"].items():
            missing = [p for p in sig["params"] if p not in self.params]
            if missing:
                raise ArtifactError(f"artifact {str(self.path)!r}: function {name!r} takes "
                                    f"parameters that {PARAMS} lacks: {', '.join(missing[:5])}")
        self.functions = {name: Function(self, name, sig)
                          for name, sig in self.manifest["functions"].items()}
        self._local = threading.local()

    def vm(self) -> relax.VirtualMachine:
        """The calling thread's virtual machine (a VM is not shared between threads)."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            vm = self._local.vm = relax.VirtualMachine(self.library, self.device)
        return vm

    def function(self, name: str) -> "Function":
        if name not in self.functions:
            raise RuntimeInputError(f"artifact has no function {name!r}; it has "
                                    f"{', '.join(self.functions)}")
        return self.functions[name]

    @property
    def main(self) -> "Function":
        if "main" in self.functions:
            return self.functions["main"]
        if len(self.functions) == 1:
            return next(iter(self.functions.values()))
        raise RuntimeInputError(f"artifact has several functions ({', '.join(self.functions)}); "
                                "call one with artifact.function(name)")

    def __call__(self, *args, **kwargs):
        return self.main(*args, **kwargs)

    def run(self, inputs: dict) -> dict:
        return self.main.run(inputs)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.main.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.main.outputs

    def __repr__(self) -> str:
        return f"<graft artifact {str(self.path)!r}: {', '.join(map(str, self.functions.values()))}>"


class Function:
    """One entry point of an artifact, e.g. `main`, or `prefill` and `decode`."""

    def __init__(self, artifact: Artifact, name: str, signature: dict):
        self.artifact = artifact
        self.name = name
        self.inputs = [TensorSpec.from_json(s) for s in signature["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in signature["outputs"]]
        self._params = [artifact.params[p] for p in signature["params"]]
        # EarlyExit: the layer after which each exit leaves, and how often each was taken
        # (the last count: calls that ran the whole model)
        self.exit_layers = list(signature.get("early_exit", {}).get("exits", []))
        self.exit_counts = [0] * (len(self.exit_layers) + 1) if self.exit_layers else []
        self.nonzero_inputs = dict(signature.get("nonzero_inputs") or {})
        self._counting = threading.Lock()  # calls from several threads count every exit

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.inputs))})"

    def __call__(self, *args, **kwargs):
        """Run on positional and/or keyword inputs; one output comes back as an array, several
        as a tuple of arrays."""
        outputs = self._invoke(self._gather(args, kwargs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def run(self, inputs: dict) -> dict:
        """Run on a dict of named inputs; returns a dict of named outputs."""
        outputs = self._invoke(self._gather((), inputs))
        return {spec.name: value for spec, value in zip(self.outputs, outputs)}

    def run_tvm(self, *tensors):
        """Run on already-checked tvm tensors and return the raw result (no conversion)."""
        return self.artifact.vm()[self.name](*tensors, *self._params)

    def _gather(self, args, kwargs) -> list:
        if len(args) > len(self.inputs):
            raise RuntimeInputError(f"{self.name}() takes {len(self.inputs)} input"
                                    f"{'s' if len(self.inputs) != 1 else ''} "
                                    f"({', '.join(map(str, self.inputs))}), got {len(args)}")
        values = list(args) + [None] * (len(self.inputs) - len(args))
        names = [spec.name for spec in self.inputs]
        for key, value in kwargs.items():
            if key not in names:
                raise RuntimeInputError(f"{self.name}() has no input named {key!r}; its inputs "
                                        f"are {', '.join(map(str, self.inputs))}")
            if values[names.index(key)] is not None:
                raise RuntimeInputError(f"{self.name}() got input {key!r} twice")
            values[names.index(key)] = value
        missing = [str(spec) for spec, value in zip(self.inputs, values) if value is None]
        if missing:
            raise RuntimeInputError(f"{self.name}() takes {len(self.inputs)} inputs, missing "
                                    f"{', '.join(missing)}")
        return values

    def _invoke(self, values: list) -> list[np.ndarray]:
        tensors = self.check_inputs(values)
        try:
            result = _to_numpy_list(self.run_tvm(*tensors))
        except Exception as err:  # TVM raises its own error types
            first = str(err).strip().splitlines()
            raise ExecutionError(f"{self.name}() failed in the compiled code: "
                                 f"{type(err).__name__}: {first[0] if first else ''}") from err
        if self.exit_layers:  # the compiled function returned its exit's index last
            exit_index = int(result.pop())
            with self._counting:
                self.exit_counts[exit_index] += 1
        return result

    def exit_rates(self) -> dict:
        """EarlyExit: the fraction of calls that left after each exit's layer ("layer N"), and
        that ran the whole model ("full"); empty without exits or before the first call."""
        calls = sum(self.exit_counts)
        if not calls:
            return {}
        names = [f"layer {layer}" for layer in self.exit_layers] + ["full"]
        return {name: count / calls for name, count in zip(names, self.exit_counts)}

    def check_inputs(self, values: list) -> list:
        """Convert inputs to tvm tensors, checking dtype, rank, static and symbolic dims."""
        bound: dict[str, tuple[int, str]] = {}
        tensors = []
        for spec, value in zip(self.inputs, values):
            if spec.dtype == OBJECT:  # a runtime object (a paged KV cache), passed as it is
                if isinstance(value, (np.ndarray, tvm.runtime.Tensor)):
                    raise RuntimeInputError(f"input {spec.name!r}: expected a {spec.name} "
                                            f"object, got an array")
                tensors.append(value)
                continue
            array = _as_array(value, spec)
            dtype = str(array.dtype)
            if dtype != spec.dtype:
                raise RuntimeInputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got "
                                        f"{dtype}")
            if spec.name in self.nonzero_inputs and not np.all(array):
                raise RuntimeInputError(f"input {spec.name!r} holds a zero, but it is "
                                        f"{self.nonzero_inputs[spec.name]}, which must not be "
                                        "zero")
            shape = tuple(int(d) for d in array.shape)
            if len(shape) != len(spec.shape):
                raise RuntimeInputError(f"input {spec.name!r}: expected shape {spec.shape_text()} "
                                        f"(rank {len(spec.shape)}), got {_fmt(shape)} "
                                        f"(rank {len(shape)})")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int):
                    if want != got:
                        raise RuntimeInputError(
                            f"input {spec.name!r}: expected shape {spec.shape_text()}, got "
                            f"{_fmt(shape)} (dim {axis} must be {want})")
                elif want in bound and bound[want][0] != got:
                    value0, where = bound[want]
                    raise RuntimeInputError(
                        f"input {spec.name!r}: dim {axis} is {want!r}, which {where} set to "
                        f"{value0}, but here it is {got}")
                else:
                    bound.setdefault(want, (got, f"input {spec.name!r} dim {axis}"))
            tensors.append(_to_tvm(array, self.artifact.device))
        return tensors


def _fmt(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _as_array(value, spec: TensorSpec):
    """numpy arrays, torch tensors (without importing torch), DLPack objects, tvm tensors."""
    if isinstance(value, (np.ndarray, tvm.runtime.Tensor)):
        return value
    if hasattr(value, "detach") and hasattr(value, "__dlpack__"):  # a torch tensor
        value = value.detach()
        if getattr(value, "is_cuda", False):
            return tvm.runtime.from_dlpack(value)
        return np.from_dlpack(value.contiguous())
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (RuntimeError, BufferError, TypeError):
            return tvm.runtime.from_dlpack(value)
    try:
        return np.asarray(value)
    except Exception:
        raise RuntimeInputError(f"input {spec.name!r}: expected an array ({spec.shape_text()} "
                                f"{spec.dtype}), got {type(value).__name__}") from None


def _to_tvm(array, device):
    if isinstance(array, tvm.runtime.Tensor):
        return array if array.device == device else tvm.runtime.tensor(array.numpy(), device)
    return tvm.runtime.tensor(np.asarray(array, order="C"), device)


def _to_numpy_list(result) -> list[np.ndarray]:
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    out = []
    for item in result:
        out.extend(_to_numpy_list(item))
    return out
