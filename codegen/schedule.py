"""ScheduleKernels: give every TIR kernel a schedule from the target's rules.

Rules are tried in order, dlight-style; a rule that does not match returns None and one that
fails on a kernel it did match is skipped (the next rule takes the kernel), so an unusual kernel
never stops a build. Each scheduled kernel records its rule in the `graft.schedule_rule`
attribute; the pass reports the count per rule and the kernels that got only the generic
fallback (or nothing), which `graft compile` prints.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from graft.passes.pipeline import CompileState, GraftPass

FALLBACK_RULES = {"Fallback"}


class ScheduleKernels(GraftPass):
    name = "schedule"

    def __init__(self, rules: list):
        self.rules = list(rules)

    def options(self) -> dict:
        return {"rules": [type(r).__name__ for r in self.rules]}

    def run(self, state: CompileState) -> dict:
        target = state.target or tvm.target.Target.current(allow_none=False)
        mod = state.mod.clone()
        counts: dict[str, int] = {}
        generic, failures = [], {}
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            if _is_scheduled(func):  # written scheduled (graft's int8 VNNI matmul)
                if func.attrs.get("graft.schedule_rule") is not None:
                    rule = str(func.attrs["graft.schedule_rule"])
                    counts[rule] = counts.get(rule, 0) + 1
                continue
            rule_name, scheduled, failure = apply_rules(self.rules, func, target)
            if failure is not None:
                failures[gv.name_hint] = failure
            if scheduled is None:
                generic.append(gv.name_hint)
                continue
            mod[gv] = scheduled.with_attr("tirx.is_scheduled", True) \
                .with_attr("graft.schedule_rule", rule_name)
            counts[rule_name] = counts.get(rule_name, 0) + 1
            if rule_name in FALLBACK_RULES:
                generic.append(gv.name_hint)
        state.mod = mod
        return {"rules": counts, "generic_kernels": sorted(generic),
                "rule_failures": failures}


def apply_rules(rules: list, func: tirx.PrimFunc, target) -> tuple:
    """(rule name, scheduled PrimFunc, last failure) from the first rule that schedules
    `func`; (None, None, failure) when none does."""
    failure = None
    with target:
        for rule in rules:
            try:
                sch = rule.apply(func, target, False)
            except Exception as err:  # noqa: BLE001 - a rule that cannot: try the next
                failure = f"{type(rule).__name__}: {_first_line(err)}"
                continue
            if sch is None:
                continue
            sch = sch[0] if isinstance(sch, list) else sch
            return type(rule).__name__, sch.mod["main"], failure
    return None, None, failure


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__
