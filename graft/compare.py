"""`graft bench --compare`: an artifact and the model it came from, run by ONNX Runtime or
PyTorch, timed in one process on the same inputs.

The two are timed in rounds of blocks of calls, alternating (ONNX Runtime's and torch's thread
pools keep spinning after a call and would slow down a call of the other that came right
after); the percentiles are over every timed call of each."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from graft.runtime.errors import GraftError

REFERENCES = ("onnxruntime", "torch")


def reference(kind: str, model: str | None, names: list[str], inputs: list[np.ndarray]
              ) -> Callable[[], list[np.ndarray]]:
    """A function running `model` with `kind` on `inputs` (given for the artifact's inputs
    `names`), returning its outputs as arrays."""
    if model is None:
        raise GraftError(f"--compare {kind} needs --model: the "
                         f"{'.onnx' if kind == 'onnxruntime' else '.pt2'} file the artifact "
                         "was compiled from")
    path = Path(model)
    if not path.is_file():
        raise GraftError(f"--model {model}: no such file")
    cores = len(os.sched_getaffinity(0))
    if kind == "onnxruntime":
        return _onnxruntime(path, names, inputs, cores)
    return _torch(path, inputs, cores)


def _onnxruntime(path: Path, names, inputs, cores):
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as err:
        raise GraftError(f"--compare onnxruntime needs the onnx and onnxruntime packages "
                         f"({err.name} is not installed)") from err
    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise GraftError(f"--model {path}: not a readable ONNX model ({err})") from err
    model.ir_version = min(model.ir_version, 10)  # onnx 1.23 writes 14; onnxruntime takes <= 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cores
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT's own exception types
        text = str(err).strip().splitlines()
        raise GraftError(f"--model {path}: ONNX Runtime cannot load it "
                         f"({text[-1] if text else type(err).__name__})") from err
    wanted = [i.name for i in session.get_inputs()]
    by_name = dict(zip(names, inputs))
    if set(wanted) <= set(by_name):
        feed = {name: by_name[name] for name in wanted}
    elif len(wanted) == len(inputs):  # renamed on the way in: match by position
        feed = dict(zip(wanted, inputs))
    else:
        raise GraftError(f"--model {path} takes inputs {', '.join(wanted)}; the artifact takes "
                         f"{', '.join(names)}")
    return lambda: session.run(None, feed)


def _torch(path: Path, inputs, cores):
    try:
        import torch
    except ImportError as err:
        raise GraftError("--compare torch needs PyTorch installed") from err
    try:
        module = torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001 - any load failure is a bad file
        raise GraftError(f"--model {path}: not a program saved by torch.export.save "
                         f"({type(err).__name__}: {err})") from err
    torch.set_num_threads(cores)
    args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]

    def run():
        with torch.inference_mode():
            out = module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in out]

    return run


def timed_in_blocks(fns: dict, runs: int, rounds: int = 4) -> dict:
    """Milliseconds of every timed call of each function: `rounds` rounds, in each one untimed
    call then a block of calls of every function in turn."""
    per_round = max(1, -(-runs // rounds))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: np.array(t) for name, t in times.items()}


def largest_difference(ours: list[np.ndarray], theirs: list[np.ndarray]) -> str:
    """How far the two sets of outputs are apart, in words."""
    if len(ours) != len(theirs):
        return f"the artifact gives {len(ours)} outputs, the reference {len(theirs)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        b = np.asarray(b)
        if a.shape != b.shape:
            return f"output {i} has shape {list(a.shape)} here, {list(b.shape)} in the reference"
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
    return f"outputs differ by at most {worst:.1e}"
