"""Matrix-vector products on int4 weights (decode steps of quantized models).

The kernel (`passes/quantize/formats.gemv_func`, epilogue fused in by FuseOps) computes, per
group of the reduction axis, partial sums of x times the raw 4-bit values, and applies the
group's scale and offset once to each partial sum; the eight rows of a packed word are
unrolled, so each reads its nibble with a constant mask. Schedule: tasks own tiles of TILE output
columns; a task walks the groups, accumulates one group's partial sums for its tile in
registers (vectors of lanes, the group's rows streamed), folds them into the tile's sums,
and finally runs the epilogue on the tile.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from graft.codegen.cpu import common
from graft.passes.quantize.formats import WORD_ROWS

PART, SUM, XSUM = "graft_gemv_part", "graft_gemv_sum", "graft_gemv_xsum"


class QuantizedGEMV(common.CPURule):
    TILES = (128, 64, 32)  # output columns per task, widest first
    TASKS_PER_CORE = 4   # take the narrower tile when the wider one gives fewer tasks

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        names = {sch.get(b).name_hint: b for b in common.blocks(sch)}
        if not {PART, SUM, XSUM} <= set(names):
            return None
        part, total = names[PART], names[SUM]
        lanes = common.vector_lanes(target, "float32")
        columns = common.extent(sch, sch.get_loops(total)[-2])
        tile = self.tile(columns, lanes, common.num_cores(target))
        if tile is None:
            return None
        common.inline_epilogue(sch, total)

        *lead, col, grp = sch.get_loops(total)
        col_tile, col_in = sch.split(col, [None, tile])
        sch.reorder(*lead, col_tile, grp, col_in)
        task = sch.fuse(*lead, col_tile) if lead else col_tile
        sch.parallel(task)
        sch.compute_at(part, grp, preserve_unit_loops=True)
        sch.set_scope(part, 0, "local")
        p_grp, p_col, p_kk = sch.get_loops(part)[-3:]
        sch.reorder(p_kk, p_col)
        # the rows of one word unrolled: each reads its nibble with a constant mask
        _, p_word_row = sch.split(p_kk, [None, WORD_ROWS])
        sch.unroll(p_word_row)
        p_vec, p_lane = sch.split(p_col, [None, lanes])
        sch.unroll(p_vec)
        sch.vectorize(p_lane)
        sch.decompose_reduction(part, sch.get_loops(part)[-4])

        t_vec, t_lane = sch.split(sch.get_loops(total)[-1], [None, lanes])
        sch.vectorize(t_lane)
        final = common.write_back_with_epilogue(sch, total, task)
        sch.decompose_reduction(total, sch.get_loops(total)[-3])
        common.vectorize_innermost(sch, final, lanes)
        for block in common.blocks(sch):
            if not any(sch.get(l).kind == tirx.ForKind.PARALLEL for l in sch.get_loops(block)):
                if sch.get_loops(block) and common.is_spatial(sch, block):
                    common.parallel_vectorize(sch, block, lanes)
        return sch

    def tile(self, columns, lanes: int, cores: int) -> int | None:
        if not isinstance(columns, int):
            return None
        fitting = [t for t in self.TILES if columns % t == 0 and t % lanes == 0]
        for t in fitting:
            if columns // t >= self.TASKS_PER_CORE * cores:
                return t
        return fitting[-1] if fitting else None
