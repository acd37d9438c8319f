"""Element-wise, broadcast and transpose kernels on CPU: one loop nest, parallel over the outer
axes and vectorized along the innermost one."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from graft.codegen.cpu import common


class Elementwise(common.CPURule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        all_blocks = common.blocks(sch)
        if not all_blocks or not all(common.is_spatial(sch, b) for b in all_blocks):
            return None
        for block in all_blocks[:-1]:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - writes an output or is read twice: keep it
                pass
        for block in common.blocks(sch):
            dtype = sch.get(block).writes[0].source.dtype
            common.parallel_vectorize(sch, block, common.vector_lanes(target, dtype))
        return sch
