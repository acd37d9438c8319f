"""TuneKernels (`--tune TRIALS`): MetaSchedule searches schedules for the kernels, and a tuned
schedule replaces graft's own only where it measured faster.

Only kernels with static shapes are tuned (MetaSchedule measures concrete shapes). The records
go to a database directory (`--tune-dir`, by default ~/.cache/graft/tuning) that later
compiles read: a kernel is searched only until the database holds TRIALS measured schedules
for it, so compiling the same model again with the same TRIALS tunes nothing, and `--tune 0`
only applies what the database has. For each kernel with records, graft's rule schedule is
measured the way MetaSchedule measures (same evaluator settings, in this process), and the
tuned schedule is kept only when at least 10% faster. Runs before weight layouts are chosen,
so both are measured reading the weights as the model stores them (graft's schedule then
gains its weight panels on top).

MetaSchedule's XGBoost cost model is used when `xgboost` is installed, else random search.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx

from graft import progress
from graft.codegen.schedule import apply_rules
from graft.codegen.stack_scratch import TIR_PIPELINE
from graft.passes.pipeline import CompileState, GraftPass
from graft.runtime.errors import BuildError, GraftError

TUNED_RULE = "MetaSchedule"
# MetaSchedule's LocalRunner defaults, used for graft's own schedule too
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 100}
# a tuned kernel must be this much faster than graft's (isolated timings of a few µs move by
# more than 5% between runs)
REQUIRED_SPEEDUP = 1.1


class TuneKernels(GraftPass):
    name = "tune"

    def __init__(self, trials: int, rules: list, directory: str | os.PathLike | None = None,
                 seed: int = 0):
        if trials < 0:
            raise GraftError(f"--tune takes a number of trials >= 0, not {trials}")
        self.trials = trials
        self.rules = rules
        self.directory = Path(directory or os.environ.get("GRAFT_TUNE_DIR")
                              or "~/.cache/graft/tuning").expanduser()
        self.seed = seed

    def options(self) -> dict:
        return {"trials": self.trials, "directory": str(self.directory)}

    def run(self, state: CompileState) -> dict:
        from tvm.s_tir import meta_schedule as ms

        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        target = state.target
        self.directory.mkdir(parents=True, exist_ok=True)
        database = ms.database.JSONDatabase(work_dir=str(self.directory))
        kernels, symbolic = {}, []
        for gv, func in state.mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            if _has_symbolic_shapes(func):
                symbolic.append(gv.name_hint)
            else:
                kernels[gv] = func
        searched = [gv for gv, func in kernels.items()
                    if _measured(database, func) < self.trials]
        cost_model = "xgb" if _have_xgboost() else "random"
        if searched:
            with progress.step(f"tuning {len(searched)} kernels, {self.trials} trials each "
                               f"(MetaSchedule, {cost_model} cost model; database "
                               f"{self.directory})"):
                self._search(ms, database, [(gv, kernels[gv]) for gv in searched], target,
                             cost_model)
        replaced, kept, untuned = {}, {}, []
        for gv, func in kernels.items():
            tuned = database.query_tuning_record(_workload(func), target, "main")
            if tuned is None or not tuned.run_secs:
                untuned.append(gv.name_hint)
                continue
            tuned_s = statistics.mean(float(s) for s in tuned.run_secs)
            rule, ours, _ = apply_rules(self.rules, func, target)
            ours_s = _measure(ours, target) if ours is not None else float("inf")
            times = {"tuned_us": round(tuned_s * 1e6, 2), "graft_us": round(ours_s * 1e6, 2),
                     "graft_rule": rule}
            if tuned_s * REQUIRED_SPEEDUP < ours_s:
                scheduled = database.query_schedule(_workload(func), target, "main")
                state.mod[gv] = scheduled.mod["main"].with_attr("tirx.is_scheduled", True) \
                    .with_attr("graft.schedule_rule", TUNED_RULE)
                replaced[gv.name_hint] = times
            else:
                kept[gv.name_hint] = times
        return {"cost_model": cost_model, "searched": sorted(g.name_hint for g in searched),
                "replaced_by_tuned": replaced, "kept_graft_rule": kept,
                "no_record": sorted(untuned), "symbolic_not_tuned": sorted(symbolic)}

    def _search(self, ms, database, kernels: list, target, cost_model: str) -> None:
        names = [gv.name_hint for gv, _ in kernels]
        loggers = ms.logging.get_loggers_from_work_dir(str(self.directory), names)
        seeds = ms.utils.fork_seed(self.seed, n=len(kernels))
        contexts = [
            ms.TuneContext(mod=_workload(func), target=target,
                           space_generator="post-order-apply", search_strategy="evolutionary",
                           task_name=gv.name_hint, logger=logger, rand_state=seed,
                           num_threads="physical").clone()
            for (gv, func), logger, seed in zip(kernels, loggers, seeds)]
        # one build at a time: on a small machine, parallel builds each outlast a 30 s timeout
        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=300)
        runner = ms.runner.LocalRunner(timeout_sec=120,
                                       evaluator_config=ms.runner.EvaluatorConfig(**EVALUATOR))
        ms.tune_tasks(tasks=contexts, task_weights=[1.0] * len(contexts),
                      work_dir=str(self.directory), max_trials_global=self.trials * len(contexts),
                      max_trials_per_task=self.trials,
                      num_trials_per_iter=min(self.trials, 16), builder=builder, runner=runner,
                      database=database, cost_model=cost_model, task_scheduler="round-robin")


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _measured(database, func: tirx.PrimFunc) -> int:
    """How many measured schedules the database holds for `func`."""
    mod = _workload(func)
    if not database.has_workload(mod):
        return 0
    return len(database.get_top_k(database.commit_workload(mod), 1 << 30))


def _measure(func: tirx.PrimFunc, target) -> float:
    """Seconds per call of a scheduled kernel, on random inputs."""
    try:
        with target:
            lib = tvm.compile(_workload(func), target, tir_pipeline=TIR_PIPELINE)
    except Exception as err:  # noqa: BLE001
        raise BuildError(f"tune: graft's schedule did not build: {err}") from err
    rng = np.random.default_rng(0)
    args = []
    for buf in func.params:
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        data = rng.standard_normal(shape) if "float" in dtype else rng.integers(0, 8, shape)
        args.append(tvm.runtime.tensor(np.asarray(data).astype(dtype)))
    timer = lib.jit().time_evaluator("main", tvm.cpu(), **EVALUATOR)
    return float(timer(*args).mean)


def _has_symbolic_shapes(func: tirx.PrimFunc) -> bool:
    return any(not isinstance(param, tirx.Buffer) or
               any(not isinstance(d, tirx.IntImm) for d in param.shape)
               for param in func.params)


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _have_xgboost() -> bool:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return False
    return True
