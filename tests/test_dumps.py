"""Pass-by-pass dumps: they parse back, passes.json describes every pass, failures are kept."""

import json

import pytest
import torch
import tvm

import graft
from graft.passes import GraftPass
from graft.passes import pipeline
from graft.runtime.errors import PassError


def test_dumps_parse_back_structurally_equal(tiny_model, tmp_path, monkeypatch):
    dumped = {}
    original_after = pipeline.DumpInstrument.after

    def keep_module(self, index, item, state, seconds, did):
        # a JSON copy: some TVM passes later update PrimFunc attributes in place
        dumped[self.file_name(index, item.name).name] = tvm.ir.load_json(
            tvm.ir.save_json(state.mod))
        return original_after(self, index, item, state, seconds, did)

    monkeypatch.setattr(pipeline.DumpInstrument, "after", keep_module)
    graft.compile(tiny_model, (torch.randn(2, 8),),
                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("[0-9][0-9][0-9]_*.py"))
    assert files == sorted(dumped) and files[0] == "000_import.py"
    assert any("legalize_ops" in f for f in files) and any("schedule" in f for f in files)
    for name in files:
        parsed = tvm.script.from_source((tmp_path / name).read_text())
        tvm.ir.assert_structural_equal(parsed, dumped[name], map_free_vars=True)


def test_passes_json_has_one_entry_per_pass(tiny_model, tmp_path):
    graft.compile(tiny_model, (torch.randn(2, 8),), dump_dir=tmp_path)
    records = json.loads((tmp_path / "passes.json").read_text())
    dumps = sorted(p.name for p in tmp_path.glob("[0-9][0-9][0-9]_*.py"))
    assert [r["dump"] for r in records] == dumps
    for record in records:
        assert set(record) >= {"pass", "options", "seconds", "op_counts", "param_bytes", "flops",
                               "did"}
    first = records[0]
    # fc1: 2*2*8*16 + fc2: 2*2*16*4 multiply-adds at the example batch of 2
    assert first["pass"] == "import" and first["flops"] == 2 * 2 * 8 * 16 + 2 * 2 * 16 * 4
    assert first["op_counts"]["matmul"] == 2
    assert first["param_bytes"] == (8 * 16 + 16 + 16 * 4 + 4) * 4
    assert [r["pass"] for r in records[-3:]] == ["schedule", "fold_weight_layouts", "exit_branches"]


class Explodes(GraftPass):
    name = "explodes"

    def run(self, state):
        raise ValueError("deliberate failure on layer fc2")


def test_failing_pass_leaves_its_input_and_error(tiny_model, tmp_path):
    with pytest.raises(PassError) as info:
        graft.compile(tiny_model, (torch.randn(2, 8),), passes=[Explodes()], dump_dir=tmp_path)
    message = str(info.value)
    assert "pass 'explodes' failed as the first pass" in message
    assert "deliberate failure on layer fc2" in message
    module_file = tmp_path / "001_explodes.input.py"
    assert module_file.is_file() and str(module_file) in message
    error = (tmp_path / "001_explodes.error.txt").read_text()
    assert "ValueError: deliberate failure on layer fc2" in error
    # reproducible: the dumped input parses and is the imported module
    parsed = tvm.script.from_source(module_file.read_text())
    tvm.ir.assert_structural_equal(
        parsed, tvm.script.from_source((tmp_path / "000_import.py").read_text()))
    records = json.loads((tmp_path / "passes.json").read_text())
    assert records[-1]["pass"] == "explodes" and records[-1]["failed"] is True


def test_failure_message_names_passes_before_it(tiny_model):
    from tvm import relax

    with pytest.raises(PassError, match="pass 'explodes' failed after CanonicalizeBindings"):
        graft.compile(tiny_model, (torch.randn(2, 8),),
                      passes=[relax.transform.CanonicalizeBindings(), Explodes()])


def test_graft_diff_names_what_a_step_changed(tiny_model, tmp_path):
    """Between the import and prepack_weights, the tiny model's two Linear weights ([16, 8] and
    [4, 16], torch's [out, in]) become [in, out] copies and the transposes go away; fuse_ops
    turns its matmul + add (+ GELU) pairs into fused functions."""
    import subprocess
    import sys

    graft.compile(tiny_model, (torch.randn(2, 8),), dump_dir=tmp_path)

    def graft_diff(a, b):
        return subprocess.run([sys.executable, "-m", "graft.cli", "diff", str(a), str(b)],
                              capture_output=True, text=True, timeout=300)

    result = graft_diff(tmp_path / "import", tmp_path / "prepack_weights")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("000_import.py -> " + str(tmp_path / "005_prepack_weights.py"))
    for expected in ("  - p_fc1_weight: 16x8 float32", "  - p_fc2_weight: 4x16 float32",
                     "  + p_fc1_weight_T: 8x16 float32", "  + p_fc2_weight_T: 16x4 float32"):
        assert expected in lines, result.stdout
    assert any(line.split()[:4] == ["permute_dims", "2", "->", "0"] for line in lines)

    fused = graft_diff(tmp_path / "fold_constant", tmp_path / "fuse_ops").stdout
    assert "+ fused_matmul" in fused and "calls by kind" in fused

    same = graft_diff(tmp_path / "000", tmp_path / "000_import.py")
    assert same.stdout.strip().endswith("no changes")
    missing = graft_diff(tmp_path / "999", tmp_path / "000")
    assert missing.returncode == 2 and "no step '999'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_flops_count_a_fused_function_once_per_call(tmp_path):
    """Three Linear(8, 8) of one input: after fuse_ops they are three calls of one fused
    function; the FLOPs stay 3 x 2 x 2 x 8 x 8 through every step until `schedule`, whose
    kernels compute whole register tiles (2 rows padded to 8, 8 columns to 32: 4096 a call)."""
    class ThreeHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            return self.q(x) * self.k(x) - self.v(x)

    graft.compile(ThreeHeads().eval(), (torch.randn(2, 8),), dump_dir=tmp_path)
    records = json.loads((tmp_path / "passes.json").read_text())
    assert "fuse_ops" in [r["pass"] for r in records]
    scheduled = [r["pass"] for r in records].index("schedule")
    assert {r["pass"]: r["flops"] for r in records[:scheduled]} == {
        r["pass"]: 3 * 2 * 2 * 8 * 8 for r in records[:scheduled]}
    assert all(r["flops"] == 3 * 2 * 8 * 32 * 8 for r in records[scheduled:])
