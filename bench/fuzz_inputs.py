"""Hostile input: mutated ONNX models, corrupt .pt2 files and corrupt artifacts, fed through
`graft compile` and `graft.load` (plus a run of what compiled or loaded). Every case must end in
a compile or load that works, or in a graft error; a worker process that dies (a crash of TVM or
of anything under it) or hangs is a failure, and its case is kept for reproducing.

Seeds: real exporters' output. The digits CNN of `digits_cnn.py` and a two-layer BERT (from a
`transformers` config) exported by torch.onnx, and a set of ONNX's own backend node-test
models; a small MLP saved with torch.export.save; that MLP's compiled artifact.

Mutations (one to three per case): input shapes and dtypes, initializer dtypes, dims and data,
dropped, duplicated, reordered and rewired nodes, changed op types, domains and attributes,
opset versions, dropped outputs, flipped and truncated bytes; for .pt2 files and artifacts,
flipped bytes, truncation, replaced archive members, and edited manifests (file names that
leave the artifact, wrong shapes, dtypes, hashes and types).

    python bench/fuzz_inputs.py [--cases 2000] [--jobs 2] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASE_TIMEOUT = 120  # seconds; a case still running then counts as a hang
# "contained crash": the compile crashed in the worker (in process), and `graft compile` itself,
# which compiles in a child process, ended with its one-line report of the crash
OUTCOMES_OK = ("compiled", "loaded", "graft error", "internal error", "contained crash")
NODE_TESTS = ("test_conv_with_strides_padding", "test_gemm_default_matrix_bias", "test_matmul_3d",
              "test_softmax_axis_1", "test_layer_normalization_4d_axis1",
              "test_reshape_reordered_all_dims", "test_transpose_all_permutations_2",
              "test_concat_2d_axis_1", "test_gather_1", "test_slice", "test_reduce_mean_keepdims_example",
              "test_maxpool_2d_pads", "test_resize_upsample_scales_nearest", "test_split_equal_parts_1d_opset18",
              "test_where_example", "test_expand_dim_changed", "test_batchnorm_example",
              "test_averagepool_2d_default", "test_cumsum_1d", "test_topk", "test_einsum_batch_matmul",
              "test_pad", "test_tile", "test_argmax_default_axis_example", "test_lstm_defaults")
ONNX_TYPES = list(range(0, 26))
OP_TYPES = ("Add", "Mul", "MatMul", "Conv", "Relu", "Softmax", "Reshape", "Transpose", "Concat",
            "Gather", "Slice", "Squeeze", "Unsqueeze", "ReduceMean", "Cast", "Where", "Expand",
            "LayerNormalization", "Gemm", "MaxPool", "Resize", "NonZero", "Loop", "Foo")


# ----------------------------------------------------------------------------- seeds

def seed_models(workdir: Path) -> list[tuple[str, bytes]]:
    """(name, serialized ONNX model) of the seeds."""
    import onnx
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import digits_cnn

    seeds = []
    cnn = digits_cnn.build_model().eval()
    seeds.append(("digits_cnn", _torch_onnx(cnn, (torch.randn(2, 1, 32, 32),), ["images"],
                                            {"images": {0: "batch"}}, workdir / "cnn.onnx")))
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = BertModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 500, (2, 16))
    seeds.append(("bert_2layer", _torch_onnx(Hidden().eval(), (ids, torch.ones_like(ids)),
                                             ["input_ids", "attention_mask"],
                                             {"input_ids": {0: "batch", 1: "seq"},
                                              "attention_mask": {0: "batch", 1: "seq"}},
                                             workdir / "bert.onnx")))
    from onnx.backend.test.case.node import collect_testcases

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = {c.name: c for c in collect_testcases(None)}
    for name in NODE_TESTS:
        if name in cases:
            model = cases[name].model
            model.ir_version = min(model.ir_version, 10)
            seeds.append((name, model.SerializeToString()))
    assert all(onnx.load_from_string(b) for _, b in seeds)
    return seeds


def _torch_onnx(module, args, names, dynamic_axes, path: Path) -> bytes:
    import onnx
    import torch

    torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"],
                      dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()


def seed_pt2_and_artifact(workdir: Path) -> tuple[bytes, Path]:
    import torch

    import graft

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return torch.softmax(self.fc2(torch.relu(self.fc1(x))), -1)

    x = torch.randn(3, 8)
    program = torch.export.export(MLP().eval(), (x,),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(workdir / "mlp.pt2"))
    artifact = workdir / "mlp_artifact"
    graft.compile(program).save(artifact)
    return (workdir / "mlp.pt2").read_bytes(), artifact


# ----------------------------------------------------------------------------- mutations

def mutate_onnx(model_bytes: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    import onnx

    model = onnx.load_from_string(model_bytes)
    done = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        name = rng.choice(MODEL_MUTATIONS)
        if name == "bytes":
            continue  # applied to the serialized model, below
        try:
            if MUTATIONS[name](model, rng) is not False:
                done.append(name)
        except (IndexError, ValueError):  # nothing of that kind in this model
            pass
    data = model.SerializeToString()
    if not done or rng.random() < 0.08:
        data = _corrupt_bytes(data, rng)
        done.append("bytes")
    return data, done


def _graph_inputs(model):
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _input_dim(model, rng):
    value = rng.choice(_graph_inputs(model))
    dims = value.type.tensor_type.shape.dim
    dim = rng.choice(dims)
    if rng.random() < 0.2:
        dim.dim_param = rng.choice(("n", "batch", "seq", "a b", ""))
    else:
        dim.dim_value = rng.choice((0, 1, 2, 3, 5, 7, 64, 1 << 20, 1 << 40, -1, -7))


def _input_rank(model, rng):
    shape = rng.choice(_graph_inputs(model)).type.tensor_type.shape
    if shape.dim and rng.random() < 0.5:
        del shape.dim[rng.randrange(len(shape.dim))]
    else:
        shape.dim.add().dim_value = rng.choice((1, 2, 3))


def _input_dtype(model, rng):
    rng.choice(_graph_inputs(model)).type.tensor_type.elem_type = rng.choice(ONNX_TYPES)


def _output_dtype(model, rng):
    rng.choice(model.graph.output).type.tensor_type.elem_type = rng.choice(ONNX_TYPES)


def _initializer_dtype(model, rng):
    rng.choice(model.graph.initializer).data_type = rng.choice(ONNX_TYPES)


def _initializer_dims(model, rng):
    tensor = rng.choice(model.graph.initializer)
    if tensor.dims and rng.random() < 0.6:
        tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice((0, 1, 2, 3, 100, -1))
    else:
        tensor.dims.append(rng.choice((1, 2)))


def _initializer_data(model, rng):
    tensor = rng.choice(model.graph.initializer)
    if tensor.raw_data:
        tensor.raw_data = tensor.raw_data[:rng.randrange(len(tensor.raw_data) + 1)]
    elif tensor.float_data:
        del tensor.float_data[rng.randrange(len(tensor.float_data)):]
    elif tensor.int64_data:
        del tensor.int64_data[rng.randrange(len(tensor.int64_data)):]
    else:
        tensor.raw_data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))


def _drop_node(model, rng):
    del model.graph.node[rng.randrange(len(model.graph.node))]


def _duplicate_node(model, rng):
    i = rng.randrange(len(model.graph.node))
    model.graph.node.insert(rng.randrange(len(model.graph.node) + 1), copy.deepcopy(
        model.graph.node[i]))


def _shuffle_nodes(model, rng):
    nodes = list(model.graph.node)
    i, j = rng.randrange(len(nodes)), rng.randrange(len(nodes))
    nodes[i], nodes[j] = nodes[j], nodes[i]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _rewire_input(model, rng):
    node = rng.choice([n for n in model.graph.node if n.input])
    names = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output]
    names += [i.name for i in model.graph.initializer] + ["", "missing_tensor"]
    node.input[rng.randrange(len(node.input))] = rng.choice(names)


def _add_input(model, rng):
    node = rng.choice(model.graph.node)
    names = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output]
    node.input.append(rng.choice(names))


def _op_type(model, rng):
    rng.choice(model.graph.node).op_type = rng.choice(OP_TYPES)


def _domain(model, rng):
    rng.choice(model.graph.node).domain = rng.choice(("com.microsoft", "ai.onnx.ml", "x.y", ""))


def _attribute(model, rng):
    import onnx

    node = rng.choice(model.graph.node)
    if node.attribute and rng.random() < 0.75:
        attr = rng.choice(node.attribute)
        if rng.random() < 0.25:
            node.attribute.remove(attr)
        elif attr.type == onnx.AttributeProto.INT:
            attr.i = rng.choice((0, 1, -1, 2, 3, 7, 1 << 31, -(1 << 40)))
        elif attr.type == onnx.AttributeProto.INTS:
            values = [rng.choice((0, 1, -1, 2, 3, 99)) for _ in range(rng.randrange(0, 7))]
            del attr.ints[:]
            attr.ints.extend(values)
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = rng.choice((0.0, -1.0, 1e30, float("nan"), float("inf")))
        elif attr.type == onnx.AttributeProto.STRING:
            attr.s = rng.choice((b"", b"bogus", b"NOTSET", b"linear"))
        else:
            attr.type = rng.choice((onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT))
    else:
        node.attribute.append(onnx.helper.make_attribute(
            rng.choice(("axis", "perm", "bogus", "group", "kernel_shape")),
            rng.choice((1, -3, [2, 2], 0.5, "x"))))


def _opset(model, rng):
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = rng.choice((1, 6, 9, 11, 13, 18, 22, 23, 30, 0, -1))


def _drop_output(model, rng):
    if rng.random() < 0.5:
        del model.graph.output[rng.randrange(len(model.graph.output))]
    else:
        rng.choice(model.graph.output).name = rng.choice(("nowhere", ""))


def _corrupt_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    if rng.random() < 0.4:
        return bytes(data[:rng.randrange(len(data))])
    for _ in range(rng.randrange(1, 20)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


MUTATIONS = {"input_dim": _input_dim, "input_rank": _input_rank, "input_dtype": _input_dtype,
             "output_dtype": _output_dtype, "initializer_dtype": _initializer_dtype,
             "initializer_dims": _initializer_dims, "initializer_data": _initializer_data,
             "drop_node": _drop_node, "duplicate_node": _duplicate_node,
             "shuffle_nodes": _shuffle_nodes, "rewire_input": _rewire_input,
             "add_input": _add_input, "op_type": _op_type, "domain": _domain,
             "attribute": _attribute, "opset": _opset, "drop_output": _drop_output}
MODEL_MUTATIONS = list(MUTATIONS) + ["bytes"]


def mutate_pt2(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    import io
    import zipfile

    how = rng.choice(("truncate", "flip", "member", "member", "empty"))
    if how == "member":
        source = zipfile.ZipFile(io.BytesIO(data))
        names = source.namelist()
        victim = rng.choice(names)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for name in names:
                content = source.read(name)
                if name == victim:
                    content = _corrupt_bytes(content, rng) if content and rng.random() < 0.7 \
                        else b""
                target.writestr(name, content)
        return out.getvalue(), [f"member {victim.split('/')[-1]}"]
    if how == "empty":
        return b"", ["empty"]
    return _corrupt_bytes(data, rng) if how == "flip" else data[:rng.randrange(len(data))], [how]


def mutate_artifact(source: Path, target: Path, rng: random.Random) -> list[str]:
    shutil.copytree(source, target)
    files = sorted(p.name for p in target.iterdir())
    how = rng.choice(("file", "file", "manifest", "manifest", "manifest", "delete"))
    if how == "delete":
        victim = rng.choice(files)
        (target / victim).unlink()
        return [f"delete {victim}"]
    if how == "file":
        victim = target / rng.choice(files)
        victim.write_bytes(_corrupt_bytes(victim.read_bytes(), rng))
        return [f"corrupt {victim.name}"]
    manifest = json.loads((target / "manifest.json").read_text())
    edit = rng.choice(MANIFEST_EDITS)
    edit(manifest, rng)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return [f"manifest {edit.__name__.strip('_')}"]


def _paths(manifest, rng):
    files = manifest.get("files")
    if isinstance(files, dict) and files:
        key = rng.choice(sorted(files))
        files[rng.choice(("../" + key, "/etc/passwd", "sub/../../x", key + "\x00"))] = \
            files.pop(key)
    else:
        manifest["files"] = {"../../etc/passwd": "0" * 64}


def _hash(manifest, rng):
    files = manifest.get("files")
    if isinstance(files, dict) and files:
        key = rng.choice(sorted(files))
        files[key] = rng.choice(("0" * 64, "", 5, None))


def _function_shape(manifest, rng):
    function = next(iter(manifest["functions"].values()))
    spec = rng.choice(function["inputs"] + function["outputs"])
    spec["shape"] = rng.choice(([], [1], ["batch", 9], ["batch", 8, 1], [-1, 8], ["", 8],
                                [1 << 40, 8], "batchx8", None))


def _function_dtype(manifest, rng):
    function = next(iter(manifest["functions"].values()))
    rng.choice(function["inputs"] + function["outputs"])["dtype"] = rng.choice(
        ("int64", "float16", "object", "complex64", "bogus", 3))


def _function_params(manifest, rng):
    function = next(iter(manifest["functions"].values()))
    params = function["params"]
    choice = rng.randrange(4)
    if choice == 0 and params:
        params.pop(rng.randrange(len(params)))
    elif choice == 1 and params:
        params.reverse()
    elif choice == 2:
        params.append("no_such_param")
    else:
        function["params"] = None


def _drop_key(manifest, rng):
    key = rng.choice(sorted(manifest))
    if rng.random() < 0.5:
        del manifest[key]
    else:
        manifest[key] = rng.choice((None, 7, "x", [], {}))


def _device(manifest, rng):
    manifest["device"] = rng.choice(("cuda", "metal", "", None, 0))


MANIFEST_EDITS = (_paths, _hash, _function_shape, _function_dtype, _function_params, _drop_key,
                  _device)


# ----------------------------------------------------------------------------- running

WORKER = r"""
import contextlib, io, json, os, sys, warnings
warnings.simplefilter("ignore")
os.environ.setdefault("GRAFT_NUM_THREADS", "1")
results = os.fdopen(os.dup(1), "w")  # the pipe to the harness; anything else printed is lost
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # TVM's C++ logging; outcomes come from graft
import numpy as np
from graft import cli, progress
from graft.runtime.errors import GraftError
progress.set_enabled(False)

def run_artifact(path):
    import graft
    artifact = graft.load(path)
    rng = np.random.default_rng(0)
    for function in artifact.functions.values():
        if any(spec.dtype == "object" for spec in function.inputs):
            continue
        inputs = []
        shapes = [[d if isinstance(d, int) else 2 for d in spec.shape] for spec in function.inputs]
        if any(np.prod(shape, dtype=float) > 1e8 for shape in shapes):
            continue  # inputs too large to make here; compiling it was the test
        for spec, shape in zip(function.inputs, shapes):
            inputs.append(rng.integers(0, 2, shape).astype(spec.dtype) if "int" in spec.dtype
                          else rng.standard_normal(shape).astype(spec.dtype))
        function(*inputs)

for line in sys.stdin:
    case = json.loads(line)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            if case["kind"] == "artifact":
                try:
                    run_artifact(case["path"])
                    outcome = "loaded"
                except GraftError as e:
                    outcome = "graft error"
                    print(f"graft: error: {e}", file=sys.stderr)
            else:
                rc = cli.main(["compile", case["path"], "-o", case["out"], "--quiet"])
                outcome = {0: "compiled", 2: "graft error", 1: "internal error"}.get(rc, f"rc {rc}")
                if rc == 0:
                    try:
                        run_artifact(case["out"])
                    except GraftError as e:
                        outcome = "graft error"
                        print(f"graft: error (running it): {e}", file=sys.stderr)
        except BaseException as e:
            outcome = "uncaught"
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
    message = err.getvalue().strip().splitlines()
    print(json.dumps({"outcome": outcome, "message": message[-1][:300] if message else ""}),
          file=results, flush=True)
"""


class Worker:
    def __init__(self):
        # GRAFT_COMPILE_CHILD: `graft compile` in this process, as the CLI's child runs it (a
        # crash then shows here, instead of being reported by the CLI's parent process)
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRAFT_COMPILE_CHILD="1")
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)

    def run(self, case: dict, timeout: float) -> dict:
        import selectors

        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            self.process.kill()
            self.process.wait()
            return {"outcome": "hang", "message": f"no result after {timeout:.0f} s"}
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            return {"outcome": "crash", "message": f"worker died with exit status {code}"}
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self):
        if self.alive:
            self.process.stdin.close()
            self.process.wait(timeout=30)


def _through_the_cli(case: dict, timeout: float, crashed: dict) -> dict:
    """A case that crashed the worker, run again as a user would: `graft compile` must report
    the crash in one line (exit status 1) instead of dying with it."""
    try:
        run = subprocess.run([sys.executable, "-m", "graft.cli", "compile", case["path"], "-o",
                              case["out"]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": "hang", "message": f"graft compile: no result after {timeout:.0f} s"}
    last = run.stderr.strip().splitlines()[-1:] or [""]
    if run.returncode == 1 and "the compiler crashed" in last[0]:
        return {"outcome": "contained crash", "message": last[0][:300]}
    return {"outcome": "crash", "message": f"{crashed['message']}; graft compile then exited "
                                           f"{run.returncode}: {last[0][:200]}"}


def make_cases(count: int, seed: int, workdir: Path) -> list[dict]:
    rng = random.Random(seed)
    models = seed_models(workdir)
    pt2, artifact = seed_pt2_and_artifact(workdir)
    cases = []
    for i in range(count):
        roll = rng.random()
        case_dir = workdir / f"case{i:05d}"
        case_dir.mkdir()
        if roll < 0.8:
            name, data = rng.choice(models)
            data, done = mutate_onnx(data, rng)
            path = case_dir / f"{name}.onnx"
            kind = "onnx"
        elif roll < 0.9:
            name = "mlp"
            data, done = mutate_pt2(pt2, rng)
            path = case_dir / "mlp.pt2"
            kind = "pt2"
        else:
            name, data = "mlp_artifact", None
            path = case_dir / "artifact"
            done = mutate_artifact(artifact, path, rng)
            kind = "artifact"
        if data is not None:
            path.write_bytes(data)
        cases.append({"index": i, "kind": kind, "seed": name, "mutations": done,
                      "path": str(path), "out": str(case_dir / "out")})
    return cases


def run_cases(cases: list[dict], jobs: int, keep: Path | None = None,
              timeout: float = CASE_TIMEOUT, log=print) -> dict:
    """Run every case; returns {"outcomes": Counter, "failures": [case + result], ...}."""
    import threading

    pending = list(reversed(cases))
    lock = threading.Lock()
    outcomes = collections.Counter()
    failures, messages = [], collections.Counter()
    started = time.perf_counter()

    def drain():
        worker = Worker()
        while True:
            with lock:
                if not pending:
                    break
                case = pending.pop()
            result = worker.run(case, timeout)
            if not worker.alive:
                worker = Worker()
                if result["outcome"] == "crash" and case["kind"] != "artifact":
                    result = _through_the_cli(case, timeout, result)
            with lock:
                outcomes[result["outcome"]] += 1
                if result["outcome"] not in OUTCOMES_OK:
                    failures.append({**case, **result})
                    if keep is not None:
                        keep.mkdir(parents=True, exist_ok=True)
                        target = keep / f"case{case['index']:05d}_{Path(case['path']).name}"
                        (shutil.copytree if Path(case["path"]).is_dir() else shutil.copy)(
                            case["path"], target)
                elif result["outcome"] in ("graft error", "internal error", "contained crash"):
                    messages[(result["outcome"], _normalized(result["message"]))] += 1
                done = sum(outcomes.values())
                if done % 100 == 0:
                    log(f"  {done}/{len(cases)} cases, {time.perf_counter() - started:.0f} s: "
                        f"{dict(outcomes)}")
            shutil.rmtree(case["out"], ignore_errors=True)
        worker.close()

    threads = [threading.Thread(target=drain) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"outcomes": outcomes, "failures": failures, "messages": messages,
            "seconds": time.perf_counter() - started}


def _normalized(message: str) -> str:
    import re

    message = re.sub(r"'[^']*'", "'…'", message)
    return re.sub(r"\d+", "N", message)[:160]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="copy each failing case here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        cases = make_cases(args.cases, args.seed, Path(scratch))
        kinds = collections.Counter(c["kind"] for c in cases)
        print(f"{len(cases)} cases: {dict(kinds)}", flush=True)
        result = run_cases(cases, args.jobs, args.keep, log=lambda s: print(s, flush=True))
    outcomes = result["outcomes"]
    print(f"outcomes of {len(cases)} cases in {result['seconds']:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    for kind, title in (("internal error", "internal errors (graft's or TVM's exceptions, "
                                            "reported in one line)"),
                        ("contained crash", "native crashes in the compile, which graft compile "
                                            "reported in one line")):
        listed = [(m, c) for (o, m), c in result["messages"].most_common() if o == kind]
        if listed:
            print(f"{title}:")
            for message, count in listed:
                print(f"  {count:5d}  {message}")
    print("most common errors:")
    for (outcome, message), count in result["messages"].most_common(25):
        print(f"  {count:5d}  {outcome}: {message}")
    for failure in result["failures"]:
        print(f"FAILED case {failure['index']} ({failure['kind']} {failure['seed']}, "
              f"{', '.join(failure['mutations'])}): {failure['outcome']}: {failure['message']}")
    crashes = sum(outcomes[k] for k in outcomes if k not in OUTCOMES_OK)
    print(f"crashes, hangs and uncaught exceptions: {crashes}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
