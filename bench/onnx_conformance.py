"""ONNX backend node-test conformance of graft's ONNX path.

Generates ONNX's backend node tests from the installed `onnx` package
(`onnx.backend.test.case.node`; the wheel does not ship the data files), compiles each model
with graft, runs it through graft's runtime, and compares with the stored outputs. Each test
runs in a worker process with a per-test timeout; a worker that hangs or crashes is replaced.

Prints the pass count overall, for opset <= 22, and for opset <= 22 without the tests that are
out of an inference compiler's scope (issue 8's measure): training-only ops (the losses, the
ai.onnx.preview.training optimizers, ops run in training mode: the `*training*` tests of
Dropout and BatchNormalization) and tests whose inputs or outputs are strings. Then the most
common failure reasons.

    python bench/onnx_conformance.py [--jobs 2] [--timeout 60] [-k PATTERN] [--save-artifacts]
    python bench/onnx_conformance.py --runtime onnxruntime   # the same tests, compared alike

Outputs are compared as ONNX's backend test runner compares them (`compare`).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import queue
import re
import sys
import tempfile
import time
import warnings


TRAINING_ONLY_OPS = {"NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss", "Adagrad", "Adam",
                     "Momentum", "Gradient"}


def in_scope(test) -> bool:
    """Not training-only, no string data (see the module docstring)."""
    import numpy as np
    import onnx

    name, model_bytes, inputs, outputs = test[:4]
    if "training" in name:
        return False
    model = onnx.load_from_string(model_bytes)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    if any(op in TRAINING_ONLY_OPS or domain == "ai.onnx.preview.training" for domain, op in ops):
        return False
    if any(loss in name for loss in ("_nllloss_", "_sce_", "negative_log_likelihood",
                                     "softmax_cross_entropy")):
        return False  # the losses' `_expanded` forms, whose nodes are the loss's body
    return not any(isinstance(x, np.ndarray) and x.dtype.kind in "OSU"
                   for x in list(inputs) + list(outputs))


def collect():
    """(name, model bytes, inputs, outputs, rtol, atol, opset) for every node test."""
    import numpy as np
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    tests = []
    for case in cases:
        opset = max((o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx")),
                    default=0)
        data = case.data_sets[0] if case.data_sets else ([], [])
        tests.append((case.name, case.model.SerializeToString(), list(data[0]), list(data[1]),
                      float(case.rtol), float(case.atol), opset))
    return tests


def run_one(test, save_artifacts: bool, scratch: str, runtime: str = "graft") -> tuple[str, str]:
    """('pass', '') or ('fail', reason)."""
    import numpy as np
    import onnx

    import graft
    from graft.runtime.signature import TensorSpec

    name, model_bytes, inputs, outputs, rtol, atol, _ = test
    model = onnx.load_from_string(model_bytes)
    if runtime == "onnxruntime":
        return run_onnxruntime(model, test, scratch)
    inputs = [_as_array(x) for x in inputs]
    outputs = [_as_array(y) for y in outputs]
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(graph_inputs) != len(inputs) or not all(isinstance(x, np.ndarray) for x in inputs):
        return "fail", "non-tensor (sequence/optional) or omitted inputs"
    if not all(isinstance(y, np.ndarray) for y in outputs):
        return "fail", "non-tensor (sequence/optional) outputs"
    specs = [TensorSpec(i.name, list(x.shape), str(x.dtype)) for i, x in zip(graph_inputs, inputs)]
    try:
        compiled = graft.compile(model, input_specs=specs)
        if save_artifacts:
            path = os.path.join(scratch, "artifact")
            compiled.save(path)
            results = graft.load(path).main.run({s.name: x for s, x in zip(specs, inputs)})
            got = list(results.values())
        else:
            import tvm
            from tvm import relax

            vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
            sig = compiled.signatures["main"]
            args = [tvm.runtime.tensor(np.asarray(x, order="C")) for x in inputs]
            args += [tvm.runtime.tensor(compiled.params[p]) for p in sig["params"]]
            from graft.runtime.session import _to_numpy_list

            got = _to_numpy_list(vm["main"](*args))
    except Exception as err:  # classify every failure by its first line
        return "fail", f"{type(err).__name__}: {_first_line(err)}"
    return compare(got, outputs, rtol, atol)


def run_onnxruntime(model, test, scratch) -> tuple[str, str]:
    """The same test through ONNX Runtime (CPU, all graph optimizations), which also takes
    sequence and optional values."""
    import onnxruntime as ort

    from graft.frontend.onnx_frontend import save_for_onnxruntime

    _, _, inputs, outputs, rtol, atol, _ = test
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    try:
        path = os.path.join(scratch, "model.onnx")
        save_for_onnxruntime(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feeds = {n: _as_value(x) for n, x in zip(graph_inputs, inputs)}
        expected = [_as_value(y) for y in outputs]
        if any(_is_ml_float(getattr(x, "dtype", None)) for x in feeds.values()) or any(
                _is_ml_float(getattr(y, "dtype", None)) for y in expected):
            got = _run_ml_dtypes(session, feeds, expected)
        else:
            got = [_as_value(g) for g in session.run(None, feeds)]
    except Exception as err:  # noqa: BLE001 - classified like graft's failures
        return "fail", f"{type(err).__name__}: {_first_line(err)}"
    return compare(got, expected, rtol, atol)


def _run_ml_dtypes(session, feeds, expected):
    """ONNX Runtime's numpy interface refuses bfloat16 and float8 arrays: those go in as
    OrtValues of the raw bits, and come out read from the output's memory."""
    import ctypes

    import numpy as np
    import onnx
    import onnxruntime as ort

    values = {}
    for name, x in feeds.items():
        if _is_ml_float(x.dtype):
            bits = x.view(np.uint8 if x.dtype.itemsize == 1 else np.uint16)
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(bits), onnx.helper.np_dtype_to_tensor_dtype(x.dtype))
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x))
    got = []
    for value, want in zip(session.run_with_ort_values(None, values), expected):
        if not _is_ml_float(want.dtype):
            got.append(value.numpy())
            continue
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        got.append(np.frombuffer(raw, want.dtype).reshape(value.shape()).copy())
    return got


def _as_value(value):
    """A tensor as an array; a sequence as a list of them; an absent optional as None."""
    if isinstance(value, (list, tuple)):
        return [_as_value(v) for v in value]
    return None if value is None else _as_array(value)


def compare(got, outputs, rtol, atol) -> tuple[str, str]:
    """As ONNX's backend test runner compares: within rtol/atol (NaN equal to NaN), floats of
    the ml_dtypes types (bfloat16, float8) through float32 and bfloat16 within two of its
    ulps; other types exactly."""
    import ml_dtypes
    import numpy as np

    if len(got) != len(outputs):
        return "fail", f"wrong number of outputs ({len(got)} vs {len(outputs)})"
    for g, e in zip(got, outputs):
        if isinstance(e, list) or e is None:  # a sequence or an optional (ONNX Runtime only)
            if not isinstance(g, list) or len(g) != len(e or []) or (e is None) != (g is None):
                return "fail", "wrong sequence or optional output"
            status = compare(g, e, rtol, atol) if e else ("pass", "")
            if status[0] != "pass":
                return status
            continue
        if g.shape != e.shape:
            return "fail", "wrong output shape"
        g = g.astype(e.dtype) if e.dtype != object else g
        if e.dtype.kind in "fc" or _is_ml_float(e.dtype):
            output_rtol = max(rtol, 2 ** -6) if e.dtype == ml_dtypes.bfloat16 else rtol
            if _is_ml_float(e.dtype):
                g, e = g.astype(np.float32), e.astype(np.float32)
            try:
                np.testing.assert_allclose(g, e, rtol=output_rtol, atol=atol, equal_nan=True)
            except AssertionError:
                return "fail", "wrong output values"
        elif not np.array_equal(g, e):
            return "fail", "wrong output values"
    return "pass", ""


def _is_ml_float(dtype) -> bool:
    """bfloat16 and the float8 types (ml_dtypes' floats; numpy calls some of them kind 'V')."""
    import ml_dtypes

    if dtype is None or dtype.type.__module__ != "ml_dtypes":
        return False
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _as_array(value):
    """Test data comes as arrays, numpy scalars, or TensorProtos (for float8/int4 dtypes)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def worker(tasks, results, save_artifacts, runtime):
    os.environ.setdefault("GRAFT_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # TVM's C++ warnings; failures are classified from the exceptions
    import io
    import contextlib

    from graft import progress

    progress.set_enabled(False)
    with tempfile.TemporaryDirectory() as scratch:
        while True:
            item = tasks.get()
            if item is None:
                return
            index, test = item
            results.put(("start", index, os.getpid()))
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    status, reason = run_one(test, save_artifacts, scratch, runtime)
                except BaseException as err:  # noqa: BLE001 - a test must not kill the worker
                    status, reason = "fail", f"{type(err).__name__}: {_first_line(err)}"
            results.put(("done", index, (status, reason)))


def normalize(reason: str) -> str:
    """Group reasons that differ only in names and numbers."""
    reason = reason.split(". Supply a converter")[0]
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    reason = re.sub(r"\b\d+(\.\d+)?\b", "N", reason)
    reason = re.sub(r"\(at [^)]*\)", "(at …)", reason)
    return reason[:160]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per test")
    parser.add_argument("-k", dest="pattern", help="only tests whose name matches this regex")
    parser.add_argument("--limit", type=int, help="only the first N tests")
    parser.add_argument("--save-artifacts", action="store_true",
                        help="write and load each artifact (slower; default runs in memory)")
    parser.add_argument("--runtime", choices=["graft", "onnxruntime"], default="graft",
                        help="run the tests through graft (default) or ONNX Runtime, compared "
                             "alike")
    parser.add_argument("--top", type=int, default=15, help="failure reasons to list")
    parser.add_argument("--list-failures", help="write name<TAB>reason for each failure here")
    args = parser.parse_args(argv)

    started = time.time()
    tests = collect()
    if args.pattern:
        tests = [t for t in tests if re.search(args.pattern, t[0])]
    if args.limit:
        tests = tests[: args.limit]
    print(f"{len(tests)} node tests from onnx's backend test cases "
          f"(collected in {time.time() - started:.0f} s)", flush=True)

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(tests):
        tasks.put(item)
    workers = {}

    def start_worker():
        proc = ctx.Process(target=worker, args=(tasks, results, args.save_artifacts,
                                                args.runtime), daemon=True)
        proc.start()
        workers[proc.pid] = [proc, None, 0.0]  # process, running test index, its start time

    for _ in range(max(1, args.jobs)):
        start_worker()
    outcome: dict[int, tuple[str, str]] = {}
    last_report = time.time()
    while len(outcome) < len(tests):
        try:
            kind, index, payload = results.get(timeout=1.0)
            if kind == "start":
                workers[payload][1:] = [index, time.time()]
            else:
                outcome[index] = payload
                for entry in workers.values():
                    if entry[1] == index:
                        entry[1] = None
        except queue.Empty:
            pass
        now = time.time()
        for pid, (proc, index, since) in list(workers.items()):
            timed_out = index is not None and now - since > args.timeout
            if timed_out or not proc.is_alive():
                if timed_out:
                    proc.kill()
                proc.join(timeout=5)
                del workers[pid]
                if index is not None and index not in outcome:
                    outcome[index] = ("fail", "timeout" if timed_out else
                                      f"worker crashed (exit code {proc.exitcode})")
                if len(outcome) + len(workers) < len(tests) or not workers:
                    start_worker()
        if now - last_report > 60:
            print(f"  {len(outcome)}/{len(tests)} done, {now - started:.0f} s", flush=True)
            last_report = now
    for _ in workers:
        tasks.put(None)

    passed = [i for i, (s, _) in outcome.items() if s == "pass"]
    low = [i for i in range(len(tests)) if tests[i][6] <= 22]
    passed_low = [i for i in passed if tests[i][6] <= 22]
    scoped = [i for i in low if in_scope(tests[i])]
    passed_scoped = [i for i in passed_low if i in set(scoped)]
    reasons = collections.Counter(normalize(r) for s, r in outcome.values() if s == "fail")
    print(f"{args.runtime} ONNX conformance: {len(passed)}/{len(tests)} passed "
          f"({100 * len(passed) / max(1, len(tests)):.1f}%); opset <= 22: "
          f"{len(passed_low)}/{len(low)} ({100 * len(passed_low) / max(1, len(low)):.1f}%); "
          f"{time.time() - started:.0f} s")
    print(f"opset <= 22 without training-only ops and string data: {len(passed_scoped)}/"
          f"{len(scoped)} ({100 * len(passed_scoped) / max(1, len(scoped)):.1f}%)")
    print("top failure reasons:")
    for reason, count in reasons.most_common(args.top):
        print(f"  {count:5d}  {reason}")
    if args.list_failures:
        with open(args.list_failures, "w") as f:
            for i, (s, r) in sorted(outcome.items()):
                if s == "fail":
                    f.write(f"{tests[i][0]}\t{r}\n")
    for proc, _, _ in workers.values():
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
