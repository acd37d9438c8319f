"""Tune: optional MetaSchedule tuning of the kernels, with a database later compiles reuse.

graft's schedule rules need no tuning; tuning searches further. With `trials` > 0 the kernels
are tuned (records go to the database directory); then every kernel the database has a record
for takes the best schedule found (also with `trials` = 0: a database from an earlier compile
is reused as it is). Kernels without a record are left to the schedule rules.
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax, tirx

from graft.passes.pipeline import CompileState, GraftPass

DEFAULT_DATABASE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graft" / \
    "tuning"


class Tune(GraftPass):
    name = "tune"

    def __init__(self, trials: int, database: str | os.PathLike | None = None):
        self.trials = int(trials)
        self.database = Path(database) if database else DEFAULT_DATABASE

    def options(self) -> dict:
        return {"trials": self.trials, "database": str(self.database)}

    def run(self, state: CompileState) -> dict:
        from tvm.s_tir import meta_schedule as ms

        self.database.mkdir(parents=True, exist_ok=True)
        target = state.target
        if self.trials > 0:
            ms.relax_integration.tune_relax(
                state.mod, params={}, target=target, work_dir=str(self.database),
                max_trials_global=self.trials,
                num_trials_per_iter=min(64, max(self.trials, 1)))
        before = _scheduled(state.mod)
        with target, tvm.transform.PassContext(opt_level=3):
            state.mod = relax.transform.MetaScheduleApplyDatabase(str(self.database))(state.mod)
        tuned = sorted(_scheduled(state.mod) - before)
        return {"trials": self.trials, "kernels_from_database": tuned}


def _scheduled(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None
            and bool(f.attrs.get("tirx.is_scheduled", False))}
