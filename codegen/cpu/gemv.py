"""Matrix-vector products on CPU (decode steps: one row of activations against a weight).

They are bound by memory bandwidth: every weight is read once per call, so the schedule is about
streaming. C[S, J] += A[S, K] * B[S, J, K] after normalization, then:

- B contiguous along J (weights pre-transposed to [K, N]): each task owns a strip of up to
  STRIP columns and a slice of K, accumulates vectors of outputs in a local strip while it streams
  whole rows of its slice of B; slices of K are summed afterwards (rfactor) when the columns alone
  do not make enough tasks.
- B contiguous along K (attention scores against the K cache, untransposed weights): one vector
  dot product per output, partial sums kept per vector lane and added at the end.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.target import Target

from graft.codegen.cpu import common
from graft.codegen.cpu.matmul import panel_layout, weight_panel_width


class GEMV(common.CPURule):
    STRIP = 512         # most columns one task accumulates (measured: 512 streams best)
    # ... when the weight is packed into 8 bits or fewer: a strip's slice of each weight row
    # must stay long, or every row is a new page and the stream runs at DRAM latency
    # (measured on a 576 x 49152 int8 weight: 8.0 ms at 512 columns, 1.7 ms at 4096)
    PACKED_STRIP = 4096
    TASKS_PER_CORE = 4  # parallel tasks wanted per core (load balance)

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        main = common.single_reduction_block(sch)
        if main is None or not common.only_injective_besides(sch, main):
            return None
        axes = common.gemm_axes(sch.get(main))
        if axes is None or "I" in axes["kinds"].values() or \
                {"J", "K"} - set(axes["kinds"].values()):
            return None
        common.inline_producers_keeping_gemm(sch, main)
        axes = common.gemm_axes(sch.get(main))
        if axes is None:
            return None
        contiguous_j = common.b_contiguous_along_j(sch.get(main), axes)
        dtype = sch.get(main).writes[0].source.dtype
        lanes = common.vector_lanes(target, dtype)
        cores = common.num_cores(target)

        read_a, read_b, write_c = common.normalize_gemm(sch, main, rows=False)
        sch.compute_inline(read_a)
        sch.compute_inline(read_b)
        if sch.get_consumers(write_c):
            sch.compute_inline(write_c)
        common.inline_epilogue(sch, main)
        common.inline_producers(sch, main)  # a packed weight's expansion, read in registers
        if contiguous_j:
            packed = any(tvm.DataType(str(r.source.dtype)).bits <= 8 for r in sch.get(main).reads)
            weight = common.weight_read(sch, main, 1)
            panel = weight_panel_width(int(weight.shape[1]), lanes) if weight is not None \
                else None
            if panel is not None:  # stored as the Matmul rule's panels (prefill reads it too)
                common.pack_weight(sch, main, 1, panel_layout(panel))
            self.stream_rows(sch, main, lanes, cores,
                             self.PACKED_STRIP if packed else self.STRIP, panel)
        else:
            self.dot_products(sch, main, lanes)
        for block in common.blocks(sch):
            if not any(sch.get(loop).kind == tirx.ForKind.PARALLEL for loop in sch.get_loops(block)):
                if common.is_spatial(sch, block) and sch.get_loops(block):
                    common.parallel_vectorize(sch, block, lanes)
        return sch

    def stream_rows(self, sch: s_tir.Schedule, main, lanes: int, cores: int,
                    most_columns: int, panel: int | None = None) -> None:
        """Tasks own strips of columns (and slices of K, when the strips are too few). Rows of
        B [K, N] are streamed across the strip; B in panels [N/panel, K, panel] is streamed
        one panel after another, each contiguous over K."""
        s, j, k = sch.get_loops(main)
        width = panel or max(common.vector_width(common.extent(sch, j), lanes), 1)
        strip = width * self.strip_vectors(common.extent(sch, j), width, most_columns)
        vec = min(width, lanes)
        j_strip, j_unit, j_vec, j_lane = sch.split(j, [None, strip // width, width // vec, vec])
        tasks = self.static_tasks(sch, (s, j_strip))
        slices = self.k_slices(common.extent(sch, k), tasks, cores)
        # rows: every vector of the strip per k; panels: every k per panel of the strip
        inner = (j_unit, k, j_vec) if panel else (k, j_unit, j_vec)
        if slices > 1:
            k_slice, k_row = sch.split(k, [slices, None])
            partial = sch.rfactor(k_slice, factor_axis=0)
            s, j_strip, j_unit, j_vec, j_lane, k_slice, k_row = sch.get_loops(partial)
            order = (j_unit, k_row, j_vec) if panel else (k_row, j_unit, j_vec)
            sch.reorder(k_slice, s, j_strip, *order, j_lane)
            sch.parallel(sch.fuse(k_slice, s, j_strip))
            sch.vectorize(j_lane)
            sch.decompose_reduction(partial, k_row)
            s, j_strip, j_unit, j_vec, j_lane, k_slice = sch.get_loops(main)
            sch.reorder(s, j_strip, j_unit, j_vec, k_slice, j_lane)
            sch.parallel(sch.fuse(s, j_strip))
            sch.vectorize(j_lane)
            sch.decompose_reduction(main, k_slice)
        else:
            sch.reorder(s, j_strip, *inner, j_lane)
            sch.parallel(sch.fuse(s, j_strip))
            sch.vectorize(j_lane)
            sch.decompose_reduction(main, k)

    def dot_products(self, sch: s_tir.Schedule, main, lanes: int) -> None:
        s, j, k = sch.get_loops(main)
        width = common.vector_width(common.extent(sch, k), lanes)
        sch.parallel(sch.fuse(s, j))
        if width == 1:
            return
        _, k_lane = sch.split(k, [None, width])
        partial = sch.rfactor(k_lane, factor_axis=0)
        fused, = sch.get_loops(main)[:1]
        sch.compute_at(partial, fused, preserve_unit_loops=True)
        k_vec = common.loop_of_reduction(sch, partial)
        k_lane = [loop for loop in sch.get_loops(partial)[1:] if not sch.get(loop).same_as(sch.get(k_vec))][-1]
        sch.reorder(k_vec, k_lane)
        sch.vectorize(k_lane)
        sch.decompose_reduction(partial, k_vec)

    @staticmethod
    def strip_vectors(n, width: int, most_columns: int) -> int:
        """Vectors per strip: as many as fit in `most_columns` and divide the column count."""
        most = max(most_columns // width, 1)
        if not isinstance(n, int):
            return 1  # a strip that does not divide the columns would need a tail predicate
        vectors = n // width
        count = min(most, vectors)
        while vectors % count:
            count -= 1
        return count

    @staticmethod
    def static_tasks(sch, loops) -> int:
        total = 1
        for loop in loops:
            n = common.extent(sch, loop)
            total *= n if isinstance(n, int) else 1
        return total

    def k_slices(self, k, tasks: int, cores: int) -> int:
        """How many slices of K to sum separately, so that there are enough tasks."""
        wanted = self.TASKS_PER_CORE * cores
        if tasks >= wanted or not isinstance(k, int):
            return 1
        slices = min(-(-wanted // tasks), max(k // 16, 1))
        while k % slices:
            slices -= 1
        return slices
