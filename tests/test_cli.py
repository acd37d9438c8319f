"""The CLI: one clear line and status 2 on bad input, no traceback unless --verbose."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

GRAFT = [sys.executable, "-m", "graft.cli"]


def graft_cli(*args, timeout=600):
    return subprocess.run([*GRAFT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def tiny_onnx(path, op_type="Relu", domain=""):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(op_type, ["x"], ["y"], name="my_node", domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["batch", 4])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, path)
    return path


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("graft: error: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_model_file(tmp_path):
    result = graft_cli("compile", tmp_path / "absent.onnx", "-o", tmp_path / "out")
    assert_one_line_error(result, "absent.onnx", "does not exist")
    assert not (tmp_path / "out").exists()


def test_truncated_onnx_file(tmp_path):
    good = tiny_onnx(tmp_path / "good.onnx")
    data = good.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    result = graft_cli("compile", tmp_path / "cut.onnx", "-o", tmp_path / "out")
    assert_one_line_error(result, "cut.onnx", "not a readable ONNX model")


def test_unsupported_operator_names_op_node_and_fix(tmp_path):
    model = tiny_onnx(tmp_path / "custom.onnx", op_type="FancyOp", domain="com.example")
    result = graft_cli("compile", model, "-o", tmp_path / "out")
    assert_one_line_error(result, "com.example.FancyOp", "my_node", "converters=")
    verbose = graft_cli("compile", model, "-o", tmp_path / "out", "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_compile_run_inspect(tmp_path):
    model = tiny_onnx(tmp_path / "relu.onnx")
    out = tmp_path / "art"
    result = graft_cli("compile", model, "-o", out, "--input", "x:nx4:float32")
    assert result.returncode == 0, result.stderr
    assert "main(x:nx4:float32) -> y:nx4:float32" in result.stdout
    x = np.array([[-1, 2, -3, 4]] * 3, np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = graft_cli("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "o.npz")["y"], np.maximum(x, 0))
    result = graft_cli("inspect", out)
    assert result.returncode == 0 and "in   x: nx4 float32" in result.stdout
    assert json.loads(graft_cli("inspect", out, "--json").stdout)["format_version"] == 1
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float64))
    result = graft_cli("run", out, "--inputs", tmp_path / "bad.npz")
    assert_one_line_error(result, "input 'x': expected dtype float32, got float64")


def test_bad_input_spec(tmp_path):
    model = tiny_onnx(tmp_path / "relu.onnx")
    result = graft_cli("compile", model, "-o", tmp_path / "o", "--input", "x:4xfoo-bar:float32")
    assert_one_line_error(result, "bad dim 'foo-bar'")
    result = graft_cli("compile", model, "-o", tmp_path / "o", "--input", "z:4x4:float32")
    assert_one_line_error(result, "'z'", "its inputs are x")


# the compile in this process, as the CLI's child runs it (the patches below apply there)
IN_PROCESS = dict(os.environ, GRAFT_COMPILE_CHILD="1")

KILL_DURING_BUILD = r"""
import os, sys, signal
import graft.codegen.build as build
real_build = build.build
def build_then_die(mod, target):
    executable = real_build(mod, target)
    os.kill(os.getpid(), signal.SIGKILL)
build.build = build_then_die
from graft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_interrupted_compile_leaves_no_output_directory(tmp_path):
    model = tiny_onnx(tmp_path / "relu.onnx")
    out = tmp_path / "art"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_BUILD, "compile", str(model), "-o",
                             str(out)], capture_output=True, text=True, timeout=600, env=IN_PROCESS)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()


@pytest.mark.parametrize("crash", ["SIGSEGV", "SIGABRT"])
def test_a_crash_in_the_compiler_is_one_error_line(tmp_path, crash):
    """A native crash inside the compile (as TVM can have) ends the child process only: the
    command says which step crashed, exits 1, and leaves no half-written artifact."""
    model = tiny_onnx(tmp_path / "relu.onnx")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"""
import os, signal
import graft.codegen.build as build
def crash(mod, target):
    os.kill(os.getpid(), signal.{crash})
build.build = crash
""")
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "art"
    result = subprocess.run([*GRAFT, "compile", str(model), "-o", str(out)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the compiler crashed ({crash}) in step 'generating code for " \
        "llvm'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Segfault" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))


def test_killed_while_writing_leaves_no_output_directory(tmp_path):
    """SIGKILL at a random moment while the artifact is being written."""
    model = tiny_onnx(tmp_path / "relu.onnx")
    slow_write = r"""
import sys, time
import graft.artifact as artifact
from safetensors import numpy as stn
real = stn.save_file
def slow(*a, **k):
    real(*a, **k)
    print("writing", flush=True)
    time.sleep(60)
stn.save_file = slow
from graft.cli import main
sys.exit(main(sys.argv[1:]))
"""
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-c", slow_write, "compile", str(model), "-o",
                             str(out)], stdout=subprocess.PIPE, text=True, env=IN_PROCESS)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.partial-")]
    assert leftovers  # the partial write stayed under its hidden temporary name


def matmul_onnx(path, weight):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_compile_quantized(tmp_path):
    gen = np.random.default_rng(0)
    weight = gen.standard_normal((64, 128)).astype(np.float32)
    model = matmul_onnx(tmp_path / "proj.onnx", weight)
    np.savez(tmp_path / "cal.npz", x=gen.standard_normal((6, 8, 64)).astype(np.float32))
    out = tmp_path / "art"
    result = graft_cli("compile", model, "-o", out, "--quantize", "int4", "--calibration",
                       tmp_path / "cal.npz", "--budget", "cosine>=0.95")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(graft_cli("inspect", out, "--json").stdout)
    did = manifest["passes"][0]["did"]
    assert did["layers"]["w"]["precision"] == "int4" and did["held_out_value"] >= 0.95
    x = gen.standard_normal((8, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = graft_cli("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "o.npz")["y"]
    cosine = (y * (x @ weight)).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(x @ weight,
                                                                                    axis=1)
    assert cosine.min() > 0.95

    result = graft_cli("compile", model, "-o", tmp_path / "o2", "--quantize", "int4",
                       "--calibration", tmp_path / "absent.npz")
    assert_one_line_error(result, "absent.npz", "does not exist")
    result = graft_cli("compile", model, "-o", tmp_path / "o2", "--quantize", "int4",
                       "--calibration", tmp_path / "cal.npz", "--budget", "cosine>=1.5")
    assert_one_line_error(result, "cosine>=1.5", "between 0 and 1")
    result = graft_cli("compile", model, "-o", tmp_path / "o2", "--budget", "cosine>=0.9")
    assert_one_line_error(result, "--budget and --calibration go with")
    assert not (tmp_path / "o2").exists()


def test_compile_sparse(tmp_path):
    gen = np.random.default_rng(1)
    weight = gen.standard_normal((64, 128)).astype(np.float32)  # ONNX MatMul: [K, N]
    model = matmul_onnx(tmp_path / "proj.onnx", weight)
    out = tmp_path / "art"
    result = graft_cli("compile", model, "-o", out, "--sparsify", "bsr", "--sparsity", "0.75",
                       "--sparse-block", "32x1")
    assert result.returncode == 0, result.stderr
    did = json.loads(graft_cli("inspect", out, "--json").stdout)["passes"][0]["did"]
    from graft.codegen.sparse import sparse_kernels_available
    from graft.codegen.target import resolve_target

    if sparse_kernels_available(resolve_target("cpu")):
        assert did["kernel"] == "bsr_matmul"
    else:  # graft's sparse kernels are AVX-512; elsewhere the pruned weights run dense
        assert did["kernel"].startswith("dense fallback: no sparse kernel")
    assert did["sparsity"] == 0.75
    # the 25% of 32-output x 1-input blocks of largest |W| (W [N, K] = weight.T), kept here
    scores = np.abs(weight.T.astype(np.float64)).reshape(4, 32, 64).sum(axis=1)
    keep = np.zeros(scores.size, bool)
    keep[np.argsort(-scores.ravel())[:64]] = True
    pruned = weight * np.repeat(keep.reshape(4, 64), 32, axis=0).T
    x = gen.standard_normal((8, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = graft_cli("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["y"], x @ pruned, rtol=1e-5,
                               atol=1e-5)
    result = graft_cli("compile", model, "-o", tmp_path / "o2", "--sparsify", "2:3")
    assert_one_line_error(result, "2:3", "M dividing 16")
    assert not (tmp_path / "o2").exists()


def _bench_compare_lines(result):
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    ratio = next(line for line in lines if "(medians)" in line)
    return lines, float(ratio.split("outputs differ by at most ")[1])


def test_bench_compare_onnxruntime(tmp_path):
    """`graft bench --compare onnxruntime`: percentiles of both, the ratio, and how far the
    artifact's outputs are from ONNX Runtime's on the same inputs."""
    weight = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    model = matmul_onnx(tmp_path / "proj.onnx", weight)
    assert graft_cli("compile", model, "-o", tmp_path / "art").returncode == 0
    result = graft_cli("bench", tmp_path / "art", "--compare", "onnxruntime", "--model", model,
                       "--repeat", 8)
    lines, difference = _bench_compare_lines(result)
    assert any(line.strip().startswith("graft") and "p99" in line for line in lines)
    assert any(line.strip().startswith("onnxruntime") and "p99" in line for line in lines)
    assert "graft/onnxruntime" in result.stdout
    assert difference < 1e-4


def test_bench_compare_torch(tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU()).eval()
    program = torch.export.export(module, (torch.randn(4, 32),))
    torch.export.save(program, tmp_path / "mlp.pt2")
    assert graft_cli("compile", tmp_path / "mlp.pt2", "-o", tmp_path / "art").returncode == 0
    result = graft_cli("bench", tmp_path / "art", "--compare", "torch", "--model",
                       tmp_path / "mlp.pt2", "--repeat", 8)
    lines, difference = _bench_compare_lines(result)
    assert "graft/torch" in result.stdout and difference < 1e-4


def test_bench_plain_and_compare_needs_the_model(tmp_path):
    model = tiny_onnx(tmp_path / "relu.onnx")
    assert graft_cli("compile", model, "-o", tmp_path / "art", "--input",
                     "x:2x4:float32").returncode == 0
    plain = graft_cli("bench", tmp_path / "art", "--repeat", 3)
    assert plain.returncode == 0 and "main: p50 " in plain.stdout, plain.stderr
    assert "calls/s" in plain.stdout and "peak resident memory" in plain.stdout
    assert_one_line_error(graft_cli("bench", tmp_path / "art", "--compare", "onnxruntime"),
                          "--compare onnxruntime needs --model")
    assert_one_line_error(graft_cli("bench", tmp_path / "art", "--compare", "onnxruntime",
                                    "--model", tmp_path / "missing.onnx"), "no such file")
