"""The loader: input checking, verification of the artifact, running without torch."""

import json
import os
import shutil

import numpy as np
import pytest

import graft
from graft.runtime.errors import ArtifactError, RuntimeInputError

from conftest import BLOCK_TORCH, run_python


def test_wrong_number_of_inputs(tiny_artifact):
    runtime = graft.load(tiny_artifact)
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(RuntimeInputError, match=r"takes 1 input \(x:batchx8:float32\), got 2"):
        runtime(x, x)
    with pytest.raises(RuntimeInputError, match="missing x:batchx8:float32"):
        runtime()


def test_wrong_dtype(tiny_artifact):
    with pytest.raises(RuntimeInputError, match="input 'x': expected dtype float32, got float64"):
        graft.load(tiny_artifact)(np.zeros((2, 8)))


def test_wrong_static_dim_and_rank(tiny_artifact):
    runtime = graft.load(tiny_artifact)
    with pytest.raises(RuntimeInputError, match=r"expected shape batchx8, got 2x9 \(dim 1 must be 8\)"):
        runtime(np.zeros((2, 9), np.float32))
    with pytest.raises(RuntimeInputError, match="rank 2"):
        runtime(np.zeros((8,), np.float32))


def test_symbolic_dim_bound_two_ways(tmp_path):
    import torch

    class AddPair(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    batch = torch.export.Dim("batch")
    compiled = graft.compile(AddPair(), (torch.ones(2, 3), torch.ones(2, 3)),
                             dynamic_shapes={"a": {0: batch}, "b": {0: batch}})
    compiled.save(tmp_path / "a")
    runtime = graft.load(tmp_path / "a")
    ok = runtime(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32))
    assert ok.shape == (4, 3) and ok.max() == 2.0
    with pytest.raises(RuntimeInputError,
                       match="input 'b': dim 0 is 'batch', which input 'a' dim 0 set to 4, but here it is 5"):
        runtime(np.ones((4, 3), np.float32), np.ones((5, 3), np.float32))


def test_torch_and_dlpack_inputs(tiny_model, tiny_artifact):
    import torch

    runtime = graft.load(tiny_artifact)
    x = torch.randn(2, 8, requires_grad=True)
    expected = tiny_model(x).detach().numpy()
    assert np.allclose(runtime(x), expected, atol=1e-5)

    class OnlyDLPack:  # an object that offers nothing but the DLPack protocol
        def __init__(self, array):
            self.array = array

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    assert np.allclose(runtime(OnlyDLPack(x.detach().numpy())), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["params.safetensors", "model.so"])
def test_modified_file_is_refused_by_name(tiny_artifact, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    with open(copy / name, "r+b") as f:
        f.seek(os.path.getsize(copy / name) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=f"artifact file '{name}' .* was modified"):
        graft.load(copy)


def test_format_version_and_path_traversal_refused(tiny_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        graft.load(copy)
    files = dict(manifest["files"])
    files["../outside.txt"] = {"sha256": "0" * 64, "bytes": 0}
    (copy / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(ArtifactError, match="must be plain names inside the artifact"):
        graft.load(copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        graft.load(tmp_path / "missing")


RUN_WITHOUT_TORCH = BLOCK_TORCH + r"""
import numpy as np
import graft
rt = graft.load(sys.argv[1])
out = rt(np.ones((2, 8), np.float32))
for name in ("torch", "onnx", "onnxruntime"):
    try:
        __import__(name)
        raise SystemExit(f"{name} was importable")
    except ImportError:
        pass
assert not any(m.split(".")[0] in ("torch", "onnx", "onnxruntime") for m in sys.modules)
print("ok", out.shape, float(out.sum()))
"""


def test_runtime_runs_where_torch_onnx_and_onnxruntime_cannot_be_imported(tiny_artifact):
    result = run_python(RUN_WITHOUT_TORCH, str(tiny_artifact))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok (2, 4)")
    assert abs(float(result.stdout.split()[-1]) - 2.0) < 1e-5  # softmax rows sum to 1


def test_threads_share_one_artifact(tiny_model, tiny_artifact):
    """8 threads, 10,000 calls in all, each thread with its own batch size: every result equals
    what the thread's input gives when run alone (and PyTorch's)."""
    import threading

    import torch

    runtime = graft.load(tiny_artifact)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((batch, 8)).astype(np.float32) for batch in range(1, 9)]
    alone = [runtime(x) for x in inputs]
    for x, y in zip(inputs, alone):
        np.testing.assert_allclose(y, tiny_model(torch.from_numpy(x)).detach().numpy(),
                                   atol=1e-5)
    calls_per_thread = 10_000 // len(inputs)
    mismatches, crashes = [], []
    start = threading.Barrier(len(inputs))

    def worker(index):
        try:
            start.wait()
            for call in range(calls_per_thread):
                out = runtime(inputs[index]) if call % 2 else \
                    runtime.run({"x": inputs[index]})[runtime.outputs[0].name]
                if out.shape != alone[index].shape or not np.array_equal(out, alone[index]):
                    mismatches.append((index, call))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            crashes.append(repr(err))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert crashes == [] and mismatches == [], (crashes[:3], mismatches[:10])


def test_loading_uses_every_core(tiny_artifact):
    code = ("import os, graft; from graft.runtime.session import num_threads; "
            "graft.load(os.environ['ART']); print(num_threads(), len(os.sched_getaffinity(0)))")
    result = run_python(code, env={"ART": str(tiny_artifact), "GRAFT_NUM_THREADS": "",
                                   "TVM_NUM_THREADS": ""})
    assert result.returncode == 0, result.stderr
    used, cores = map(int, result.stdout.split())
    assert used == cores


def test_an_artifact_compiled_again_into_the_same_directory_runs_its_new_code(tmp_path):
    """dlopen returns the library it loaded from a path before, even once the file there was
    replaced; the loader must run the new model.so."""
    import torch

    x = np.ones((2, 8), np.float32)
    for out_features in (4, 6):
        layer = torch.nn.Linear(8, out_features).eval()
        graft.compile(layer, (torch.from_numpy(x),)).save(tmp_path / "art")
        got = graft.load(tmp_path / "art")(x)
        with torch.no_grad():
            np.testing.assert_allclose(got, layer(torch.from_numpy(x)).numpy(), rtol=1e-5,
                                       atol=1e-5)


LOAD_PEAK = """
import sys
import numpy as np
from graft.runtime.artifact import read_safetensors

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith(key + ":"))

path, give_back = sys.argv[1], sys.argv[2] == "1"
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
if give_back:
    copies = read_safetensors(path, copy=np.array)
else:
    copies = {name: np.array(a) for name, a in read_safetensors(path).items()}
print(status("VmHWM") - before)
print(sum(float(a[::4096].astype(np.float64).sum()) for a in copies.values()))
"""


def test_parameters_are_loaded_with_one_copy_resident(tmp_path):
    """Reading parameters through the memory map and copying each one: the file's pages of a
    tensor are given back once it is copied, so the peak grows by about the parameters' size,
    not twice that (as it does when the mapped pages stay resident beside the copies)."""
    from safetensors.numpy import save_file

    gen = np.random.default_rng(0)
    params = {f"w{i}": gen.standard_normal((1024, 8192), dtype=np.float32) for i in range(6)}
    save_file(params, str(tmp_path / "params.safetensors"))
    size = sum(a.nbytes for a in params.values())  # 192 MiB
    expected = sum(float(a[::4096].astype(np.float64).sum()) for a in params.values())
    peaks = {}
    for give_back in ("0", "1"):
        result = run_python(LOAD_PEAK, tmp_path / "params.safetensors", give_back)
        assert result.returncode == 0, result.stderr
        grown, checksum = result.stdout.split()
        assert float(checksum) == pytest.approx(expected)
        peaks[give_back] = int(grown)
    assert peaks["0"] > 1.7 * size, peaks  # the copies and the mapped file both resident
    assert peaks["1"] < 1.3 * size, peaks
