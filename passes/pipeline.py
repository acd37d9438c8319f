"""The pass pipeline: a flat list of named passes run in order, with instruments that dump the
module after each pass, time it, and check that it is well formed.

A pipeline entry is either a TVM pass (`tvm.transform.Pass`, changes only the module) or a
`GraftPass` (may change the parameters too, and reports what it did).
"""

from __future__ import annotations

import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from graft import progress
from graft.ir import stats
from graft.runtime.errors import GraftError, PassError


_DUMP_FILE = re.compile(r"^\d{3}_.*\.(py|txt)$")


@dataclass
class CompileState:
    """What passes transform: the module and its parameters, plus what they report."""

    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    signatures: dict = field(default_factory=dict)  # function name -> FunctionSignature
    target: tvm.target.Target | None = None
    calibration: list | None = None
    flops_dims: dict[str, int] = field(default_factory=dict)  # symbolic dim sizes for FLOPs


class GraftPass:
    """A pass that may rewrite parameters. Subclasses set `name` and implement `run`."""

    name = "graft_pass"

    def options(self) -> dict:
        return {}

    def run(self, state: CompileState) -> dict:
        """Transform `state` in place; return what was done (recorded in passes.json)."""
        raise NotImplementedError

    def as_entry(self) -> "Entry":
        return Entry(self.name, self, self.options())


@dataclass
class Entry:
    name: str
    apply: object  # tvm.transform.Pass or GraftPass
    options: dict = field(default_factory=dict)


def entry(name: str, apply, **options) -> Entry:
    return Entry(name, apply, options)


class DumpInstrument:
    """Writes NNN_<pass>.py and passes.json to a dump directory; on failure, the module the
    failing pass was given and the error."""

    def __init__(self, dump_dir: str | Path):
        self.dir = Path(dump_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.kernel_times: dict = {}  # kernels.json: per function, its kernels' time per run
        for stale in self.dir.iterdir():  # an earlier compile's dumps would mislead
            if stale.is_file() and (_DUMP_FILE.match(stale.name) or stale.name in (
                    "passes.json", "report.html", "kernels.json")):
                stale.unlink()
        (self.dir / "passes.json").write_text("[]\n")

    def file_name(self, index: int, name: str, suffix: str = ".py") -> Path:
        return self.dir / f"{index:03d}_{name}{suffix}"

    def after(self, index: int, item: Entry, state: CompileState, seconds: float, did: dict):
        path = self.file_name(index, item.name)
        path.write_text(state.mod.script(show_meta=True))
        self.records.append({
            "index": index,
            "pass": item.name,
            "options": _jsonable(item.options),
            "seconds": round(seconds, 4),
            "op_counts": stats.op_counts(state.mod),
            "param_bytes": stats.param_bytes(state.params),
            "flops": stats.estimate_flops(state.mod, state.flops_dims),
            "flops_at": dict(state.flops_dims),
            "did": _jsonable(did),
            "dump": path.name,
        })
        self.write()

    def write(self) -> None:
        from graft.passes.report import render

        (self.dir / "passes.json").write_text(json.dumps(self.records, indent=1) + "\n")
        (self.dir / "report.html").write_text(render(self.records, self.kernel_times))

    def add_kernel_times(self, kernel_times: dict) -> None:
        self.kernel_times = kernel_times
        (self.dir / "kernels.json").write_text(json.dumps(kernel_times, indent=1) + "\n")
        self.write()

    def failed(self, index: int, item: Entry, mod_before: tvm.IRModule, error: BaseException):
        before = self.file_name(index, item.name, ".input.py")
        before.write_text(mod_before.script(show_meta=True))
        error_file = self.file_name(index, item.name, ".error.txt")
        error_file.write_text("".join(traceback.format_exception(error)))
        self.records.append({"index": index, "pass": item.name,
                             "options": _jsonable(item.options), "failed": True,
                             "error": f"{type(error).__name__}: {error}",
                             "input": before.name, "traceback": error_file.name})
        self.write()
        return before


def check_well_formed(name: str, mod: tvm.IRModule) -> None:
    try:
        relax.analysis.well_formed(mod)
    except Exception as err:  # TVM raises its own error types
        raise GraftError(f"pass {name!r} produced a module that is not well formed: "
                         f"{str(err).strip().splitlines()[0]}") from err


def run_pipeline(state: CompileState, entries: list[Entry], dumper: DumpInstrument | None = None,
                 well_formed_checks: bool = True, start_index: int = 1) -> list[dict]:
    """Run every entry in order. Returns one record per pass (name, seconds, what it did).

    Pass NNN is dumped as NNN_<name>.py; 000 is the imported module (see `DumpInstrument`).
    """
    done: list[str] = []
    records = []
    for offset, item in enumerate(entries):
        index = start_index + offset
        before = state.mod
        progress_text = f"[{offset + 1}/{len(entries)}] {item.name}"
        start = time.perf_counter()
        try:
            with progress.step(progress_text):
                did = _apply(item, state)
                if well_formed_checks:
                    check_well_formed(item.name, state.mod)
        except Exception as err:  # a pass may fail in TVM with any error type
            where = ""
            if dumper is not None:
                dumped = dumper.failed(index, item, before, err)
                where = f" The module it was given is in {dumped}, the error beside it."
            after = f"after {', '.join(done)}" if done else "as the first pass"
            message = str(err).strip().splitlines()
            raise PassError(f"pass {item.name!r} failed {after}: {type(err).__name__}: "
                            f"{message[0] if message else ''}{where}") from err
        seconds = time.perf_counter() - start
        if dumper is not None:
            dumper.after(index, item, state, seconds, did)
        records.append({"pass": item.name, "options": _jsonable(item.options),
                        "seconds": round(seconds, 4), "did": _jsonable(did)})
        done.append(item.name)
    return records


def _apply(item: Entry, state: CompileState) -> dict:
    if isinstance(item.apply, GraftPass):
        return item.apply.run(state) or {}
    if isinstance(item.apply, tvm.transform.Pass):
        target = state.target
        if target is not None:
            with target:
                state.mod = item.apply(state.mod)
        else:
            state.mod = item.apply(state.mod)
        return {}
    raise TypeError(f"pipeline entry {item.name!r} is neither a TVM pass nor a GraftPass")


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)
