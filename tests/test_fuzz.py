"""Hostile input (bench/fuzz_inputs.py with fewer cases): mutated ONNX models, corrupt .pt2
files and corrupt artifacts through `graft compile` and `graft.load`, each in a worker process.
Every case must end in a clean compile or load, or a graft error: no crash, hang or uncaught
exception."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz_inputs  # noqa: E402

CASES = 300


def test_mutated_models_and_corrupt_files_end_in_graft_errors_or_clean_compiles(tmp_path):
    cases = fuzz_inputs.make_cases(CASES, seed=12345, workdir=tmp_path)
    kinds = {c["kind"] for c in cases}
    assert kinds == {"onnx", "pt2", "artifact"}
    result = fuzz_inputs.run_cases(cases, jobs=2, log=lambda _: None)
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == CASES
    failures = [f"case {f['index']} ({f['kind']} {f['seed']}, {', '.join(f['mutations'])}): "
                f"{f['outcome']}: {f['message']}" for f in result["failures"]]
    assert failures == [], "\n".join(failures)
    # the mutations reach past the front door: some cases compile (and run), some are refused
    assert outcomes["compiled"] >= 10 and outcomes["graft error"] >= 100, dict(outcomes)
