"""--tune: MetaSchedule searches a kernel's schedule, the database is reused by later compiles,
and a tuned kernel replaces graft's own only where it measured faster; results are compared
with PyTorch eager."""

import json

import numpy as np
import pytest
import torch

import graft
from graft.codegen import tune

TRIALS = 2


class LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(96, 80)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    module, x = LinearGelu().eval(), torch.randn(64, 96)
    with torch.no_grad():
        return module, x, module(x).numpy()


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return tmp_path_factory.mktemp("tuning")


def _run(compiled, x, path):
    compiled.save(path)
    return graft.load(path)(x.numpy())


def _records(database) -> int:
    return len((database / "database_tuning_record.json").read_text().splitlines())


def test_tune_searches_once_and_later_compiles_reuse_the_database(model, database, tmp_path):
    module, x, expected = model
    first = graft.compile(module, (x,), tune=TRIALS, tune_dir=database)
    tuning = first.manifest["kernels"]["tuning"]
    assert tuning["searched"] == ["fused_matmul_add_gelu"]
    assert _records(database) == TRIALS
    (kernel, times), = {**tuning["kept_graft_rule"], **tuning["replaced_by_tuned"]}.items()
    assert times["tuned_us"] > 0 and times["graft_us"] > 0
    # whichever measured faster is what the artifact runs
    expected_rule = "MetaSchedule" if kernel in tuning["replaced_by_tuned"] else "Matmul"
    assert first.manifest["kernels"]["rules"] == {expected_rule: 1}
    np.testing.assert_allclose(_run(first, x, tmp_path / "a"), expected, rtol=1e-5, atol=1e-5)

    again = graft.compile(module, (x,), tune=TRIALS, tune_dir=database)
    assert again.manifest["kernels"]["tuning"]["searched"] == []  # nothing left to search
    assert _records(database) == TRIALS
    json.dumps(again.manifest)  # the report is plain data


def test_a_faster_tuned_schedule_replaces_graft_rule(model, database, tmp_path, monkeypatch):
    module, x, expected = model
    monkeypatch.setattr(tune, "_measure", lambda func, target: float("inf"))
    compiled = graft.compile(module, (x,), tune=0, tune_dir=database)  # records of the test above
    tuning = compiled.manifest["kernels"]["tuning"]
    assert list(tuning["replaced_by_tuned"]) == ["fused_matmul_add_gelu"]
    assert compiled.manifest["kernels"]["rules"] == {"MetaSchedule": 1}
    np.testing.assert_allclose(_run(compiled, x, tmp_path / "b"), expected, rtol=1e-5, atol=1e-5)


def test_symbolic_kernels_are_left_to_graft_rules(database):
    x = torch.randn(5, 96)
    torch.manual_seed(0)
    module = LinearGelu().eval()
    batch = torch.export.Dim("batch", min=2)
    compiled = graft.compile(module, (x,), dynamic_shapes={"x": {0: batch}}, tune=0,
                             tune_dir=database)
    tuning = compiled.manifest["kernels"]["tuning"]
    assert tuning["symbolic_not_tuned"] == ["fused_matmul_add_gelu"]
    assert compiled.manifest["kernels"]["rules"] == {"Matmul": 1}


def test_tune_refuses_a_negative_count_and_a_cuda_target():
    from graft.codegen import build as codegen
    from graft.codegen.target import resolve_target
    from graft.runtime.errors import GraftError

    with pytest.raises(GraftError, match="trials >= 0"):
        tune.TuneKernels(-1, [])
    with pytest.raises(GraftError, match="needs a CPU target"):
        codegen.lowering_entries(resolve_target({"kind": "cuda", "arch": "sm_80"}), tune=1)
