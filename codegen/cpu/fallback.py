"""The last CPU rule: any kernel no other rule took gets its outer spatial loops run in parallel
and, where its innermost loop is spatial, vectorized. graft compile reports these kernels."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from graft.codegen.cpu import common


class Fallback(common.CPURule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        all_blocks = common.blocks(sch)
        if not all_blocks:
            return None
        for block in all_blocks:
            try:
                self.schedule_block(sch, block, target)
            except Exception:  # noqa: BLE001 - a block this generic rule cannot touch stays as is
                continue
        return sch

    @staticmethod
    def schedule_block(sch: s_tir.Schedule, block, target: Target) -> None:
        stmt = sch.get(block)
        lanes = common.vector_lanes(target, stmt.writes[0].source.dtype) if stmt.writes else 1
        if common.is_spatial(sch, block):
            common.parallel_vectorize(sch, block, lanes)
            return
        loops = sch.get_loops(block)
        first_reduction = common.loop_of_reduction(sch, block)
        outer = []
        for loop in loops:
            if first_reduction is not None and sch.get(loop).same_as(sch.get(first_reduction)):
                break
            outer.append(loop)
        if outer:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
