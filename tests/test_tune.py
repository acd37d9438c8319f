"""Optional MetaSchedule tuning: a few trials on the tiny model, records kept in a database
that a second compile reuses without tuning; results still match PyTorch."""

import json

import pytest
import torch

import graft

from conftest import max_abs


@pytest.mark.slow
def test_tune_then_reuse_database(tiny_model, tmp_path):
    database = tmp_path / "db"
    example = (torch.randn(4, 8),)
    tuned = graft.compile(tiny_model, example, tuning={"trials": 4, "database": database},
                          dump_dir=tmp_path / "dumps")
    records = {r["pass"]: r for r in json.loads((tmp_path / "dumps" / "passes.json").read_text())}
    tuned_kernels = records["tune"]["did"]["kernels_from_database"]
    assert tuned_kernels, records["tune"]
    assert any(database.glob("*.json")), list(database.iterdir())

    reused = graft.compile(tiny_model, example, tuning={"trials": 0, "database": database},
                           dump_dir=tmp_path / "dumps2")
    records = {r["pass"]: r for r in
               json.loads((tmp_path / "dumps2" / "passes.json").read_text())}
    assert records["tune"]["did"]["kernels_from_database"] == tuned_kernels
    # the kernels the database did not cover still got graft's rules
    assert reused.manifest["kernels"]["generic_kernels"] == []

    for compiled, name in ((tuned, "tuned"), (reused, "reused")):
        compiled.save(tmp_path / name)
        x = torch.randn(4, 8)
        assert max_abs(graft.load(tmp_path / name)(x), tiny_model(x).detach().numpy()) < 1e-5
