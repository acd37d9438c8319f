"""Row reductions on CPU: softmax, layer norm, RMS norm, mean, and whatever element-wise work
was fused around them.

Every block shares leading "row" axes (all but the reduced/innermost ones). Rows run in parallel;
all blocks of a row are computed together under the row loop, so a row's intermediates stay in
L1. Reductions over a static innermost axis are vectorized: a partial result per vector lane
(rfactor), the lanes added at the end; element-wise blocks are vectorized along their innermost
axis.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from graft.codegen.cpu import common


class RowReduction(common.CPURule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        all_blocks = common.blocks(sch)
        reductions = [b for b in all_blocks if common.is_reduction(sch, b)]
        if not reductions or not all(common.is_reduction(sch, b) or common.is_spatial(sch, b)
                                     for b in all_blocks):
            return None
        rows = self.row_axes(sch, all_blocks)
        if not rows:
            return None
        lanes = common.vector_lanes(target, sch.get(all_blocks[-1]).writes[0].source.dtype)

        # element-wise blocks with one consumer are recomputed where they are read
        for block in all_blocks[:-1]:
            if common.is_spatial(sch, block) and len(sch.get_consumers(block)) == 1:
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - not inlinable: computed per row below
                    pass
        partials = []
        for block in [b for b in common.blocks(sch) if common.is_reduction(sch, b)]:
            partial = self.vector_partials(sch, block, lanes)
            if partial is not None:
                partials.append(partial)

        last = common.blocks(sch)[-1]
        loops = sch.get_loops(last)
        size = common.static_size(sch, loops)
        row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        if size is None or size >= common.SMALL_KERNEL:
            sch.parallel(row)
        if common.is_spatial(sch, last) and len(loops) > rows:
            common.vectorize_innermost(sch, last, lanes)
        for block in reversed(common.blocks(sch)[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=True)
        for block in common.blocks(sch)[:-1]:
            if common.is_spatial(sch, block) and \
                    not any(sch.get(block).same_as(sch.get(p)) for p in partials):
                common.vectorize_innermost(sch, block, lanes)
        for partial in partials:
            # the lane axis is the partial buffer's last index (rfactor's factor axis)
            lane_var = sch.get(partial).writes[0].region[-1].min
            lane = common.loop_of_iter(sch, partial, lambda iv: iv.var.same_as(lane_var))
            k_vec = common.loop_of_reduction(sch, partial)
            if lane is None or k_vec is None:
                continue
            sch.reorder(k_vec, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(partial, k_vec)
        return sch

    @staticmethod
    def row_axes(sch: s_tir.Schedule, all_blocks) -> int:
        """How many leading axes (the reductions' leading spatial axes) every block shares."""
        def leading(block):
            extents = []
            for iv in sch.get(block).iter_vars:
                if iv.iter_type != tirx.IterVar.DataPar:
                    break
                extents.append(iv.dom.extent)
            return extents

        reduced = [leading(b) for b in all_blocks if common.is_reduction(sch, b)]
        spatial = [leading(b) for b in all_blocks if common.is_spatial(sch, b)]
        for n in range(min(len(r) for r in reduced), 0, -1):
            rows = reduced[0][:n]
            if all(len(e) >= n and all(_same(a, b) for a, b in zip(rows, e[:n]))
                   for e in reduced + spatial):
                return n
        return 0

    @staticmethod
    def vector_partials(sch: s_tir.Schedule, block, lanes: int):
        """Split the innermost reduction into vector lanes and keep a partial result per lane
        (rfactor). Returns the partial block, or None where the reduction is not of that form."""
        loops = sch.get_loops(block)
        k = loops[-1]
        inner = common.loop_of_reduction(sch, block)
        if inner is None or not sch.get(inner).same_as(sch.get(k)):
            return None
        n = common.extent(sch, k)
        width = common.vector_width(n, lanes)
        if width <= 1 or n == width:
            return None
        _, lane = sch.split(k, [None, width])
        try:
            return sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].region))
        except Exception:  # noqa: BLE001 - e.g. a reducer rfactor cannot split: leave scalar
            return None


def _same(a, b) -> bool:
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return a.value == b.value
    from tvm_ffi import structural_equal

    return structural_equal(a, b)
