"""Dense and batched matmul on CPU, with the element-wise epilogue fused into each tile.

The main block is brought to C[S, I, J] += A[S, I, K] * B[S, J, K] (dlight's normal form), then
tiled BLIS-style: chunks of rows x columns run in parallel; inside a chunk, a register tile of
ROWS x (VECTORS * lanes) accumulates over the whole K in registers, reading one row of B as
vectors and broadcasting single elements of A; the epilogue (bias, GELU, residual add) runs on
each register tile while it is still in registers. B must be contiguous along J for that: weights
are pre-transposed at compile time (see `passes/prepack_weights.py`); any other B (attention's
K^T) is packed into [S, K, J] by a copy before the product.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target
from tvm.tirx import IndexMap

from graft.codegen.cpu import common


class Matmul(common.CPURule):
    """C = A @ B (+ element-wise epilogue), static or symbolic M, batched or not."""

    # register tiles (rows, vectors per row), in order of preference: the first whose width
    # divides the columns and whose rows divide the innermost row axis (see register_tile);
    # 8 x 2 last (a tile that straddles two rows of a batched operand makes the epilogue irregular)
    TILES = ((8, 3), (6, 4), (8, 2))
    K_UNROLL = 4      # k steps unrolled in the register-tile loop
    K_BLOCK = 512     # K is blocked when longer than 1.5 blocks (symbolic rows or batch only)
    PACK_MIN_ROWS = 512  # B is copied into panels only for at least this many (static) rows
    CHUNK_COLS = 256  # columns of a strip (its panel of B is reused by every row tile)

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        main = common.single_reduction_block(sch)
        if main is None:
            return None
        axes = common.gemm_axes(sch.get(main))
        if axes is None or {"I", "J", "K"} - set(axes["kinds"].values()):
            return None  # not a matmul, or a matrix-vector product (the GEMV rule's)
        if not common.only_injective_besides(sch, main):
            return None
        common.inline_producers(sch, main)
        lanes = common.vector_lanes(target, sch.get(main).writes[0].source.dtype)
        contiguous_j = common.b_contiguous_along_j(sch.get(main), axes)
        weight = common.weight_read(sch, main, 1) if contiguous_j else None  # [K, N]
        panel = weight_panel_width(int(weight.shape[1]), lanes) if weight is not None else None
        rows, vectors = self.register_tile(sch, main, axes, lanes, panel)
        tile_cols = lanes * vectors
        read_a, read_b, write_c = common.normalize_gemm(sch, main, rows=True)
        if sch.get_consumers(write_c):
            sch.compute_inline(write_c)
        common.inline_epilogue(sch, main)

        # pad rows to whole register tiles, columns to whole vectors pairs; the operand copies
        # are then inlined into the padding copies (or the product, where nothing was padded)
        batch, i, j, _ = sch.get_loops(main)
        row_groups = self.row_groups(sch, batch, i, target)
        sch.pad_einsum(main, [1, common.pad_factor(sch, i, rows * row_groups),
                              common.pad_factor(sch, j, tile_cols), 1])
        common.inline_epilogue(sch, main)
        sch.compute_inline(read_a)
        operand_b = self.writer_of_operand(sch, main, 1)
        if contiguous_j or not sch.get(operand_b).same_as(sch.get(read_b)):
            sch.compute_inline(read_b)
        operand_b = self.writer_of_operand(sch, main, 1)
        tc = tile_cols
        if operand_b is not None:  # a copy of B (packed or padded): as [S, J/tc, K, tc] panels
            sch.transform_layout(operand_b, ("write", 0),
                                 IndexMap.from_func(lambda s, j, k: (s, j // tc, k, j % tc)))
        elif panel is not None:  # a weight [K, N]: into panels once, at compile time
            common.pack_weight(sch, main, 1, panel_layout(tc))
        elif common.extent(sch, sch.get_loops(main)[2]) != tc and \
                self.enough_rows_to_pack(sch, main):
            # B read in place ([K, N] or [S, K, N]) with more than one panel of columns: copy it
            # into [.., N/tc, K, tc] panels (with N == tc it is already one panel), per call
            ndim = len(sch.get(main).reads[1].source.shape)
            packed = sch.cache_read(main, 1, "global")
            layout = panel_layout(tc) if ndim == 2 else \
                (lambda s, k, n: (s, n // tc, k, n % tc))
            sch.transform_layout(packed, ("write", 0), IndexMap.from_func(layout))

        # parallel over (batch, column strip, row tile); a task runs the strip's register tiles
        # over the whole K, so the strip's panel of B stays in cache across the row tiles
        batch, i, j, k = sch.get_loops(main)
        strip_cols = tile_cols * common.chunk_count(sch, j, tile_cols, self.CHUNK_COLS)
        i_tile, i_reg = sch.split(i, [None, rows])
        j_strip, j_tile, j_reg = sch.split(j, [None, strip_cols // tile_cols, tile_cols])
        # Tasks: (batch, column strip, row tile) fused when all are static. With a symbolic
        # extent, a task's tile position would come out of `task % extent`, which TVM cannot
        # prove non-negative; the register tile's offset then stays a run-time value and the
        # accumulators live in memory. So: a symbolic or large batch alone is the parallel
        # loop; otherwise the symbolic row tiles go outermost (position = task // constant).
        batch_n, rows_n = common.extent(sch, batch), common.extent(sch, i_tile)
        static_tasks = isinstance(batch_n, int) and isinstance(rows_n, int)
        # A static task is one row tile: blocking its K keeps the tile's whole strip of C in
        # memory between blocks (measured, 128x1536x384: 87-102 GFLOP/s blocked, 120-148 not)
        k_block = None if static_tasks else self.k_block(common.extent(sch, k))
        if static_tasks:
            outer, parallel = (batch, j_strip, i_tile), 3
        elif row_groups == 1:
            outer, parallel = (batch, i_tile, j_strip), 1
        else:  # symbolic rows, padded to `row_groups` groups: (strip, group) tasks, static
            i_group, i_tile = sch.split(i_tile, [row_groups, None])
            outer, parallel = (batch, j_strip, i_group, i_tile), 3
        if k_block is None:
            sch.reorder(*outer, j_tile, k, i_reg, j_reg)
            tile_level, k_first = j_tile, k
        else:  # a long K in blocks: the row tile's strip of C accumulates in L1 between them
            k_outer, k_inner = sch.split(k, [None, k_block])
            sch.reorder(*outer, k_outer, j_tile, k_inner, i_reg, j_reg)
            tile_level, k_first = None, k_outer
        tasks = sch.fuse(*outer[:parallel]) if parallel > 1 else outer[0]
        sch.parallel(tasks)
        if tile_level is None:  # the K-blocked tile accumulates at the innermost outer loop
            tile_level = tasks if parallel == len(outer) else outer[-1]

        fuse_epilogue = self.one_row_and_column_axis(axes) or flatten_epilogue(sch, main)
        final = common.write_back_with_epilogue(sch, main, tile_level, fuse_epilogue)
        self.vectorize_tile(sch, final, lanes)

        sch.unroll(i_reg)
        j_vec, j_lane = sch.split(j_reg, [None, lanes])  # whole zmm vectors, never 48 lanes
        sch.unroll(j_vec)
        sch.vectorize(j_lane)
        sch.decompose_reduction(main, k_first)
        k_loop = sch.get_loops(main)[-4]  # k (or k_inner), above i_reg, j_vec, j_lane
        if isinstance(common.extent(sch, k_loop), int) and \
                common.extent(sch, k_loop) % self.K_UNROLL == 0:
            _, k_unrolled = sch.split(k_loop, [None, self.K_UNROLL])
            sch.unroll(k_unrolled)
        for block in common.blocks(sch):
            if sch.get(block) != sch.get(main) and len(sch.get_loops(block)) and \
                    not self.is_under_parallel(sch, block):
                common.parallel_vectorize(sch, block, lanes)
        return sch

    def enough_rows_to_pack(self, sch: s_tir.Schedule, main) -> bool:
        """Whether copying B into panels pays: it costs a pass over B per call, and gains a few
        percent per row tile; a symbolic row count may be small (a short prompt)."""
        rows = common.extent(sch, sch.get_loops(main)[1])
        return isinstance(rows, int) and rows >= self.PACK_MIN_ROWS

    @staticmethod
    def row_groups(sch: s_tir.Schedule, batch, i, target: Target) -> int:
        """For symbolic rows under a small static batch: how many groups the (padded) rows are
        split into, so tasks are (strip, group) with static extents. 1 otherwise (a symbolic or
        large batch is parallel by itself)."""
        batch_n, rows_n = common.extent(sch, batch), common.extent(sch, i)
        cores = common.num_cores(target)
        if isinstance(rows_n, int) or not isinstance(batch_n, int) or batch_n >= 4 * cores:
            return 1
        return 2 * cores

    @staticmethod
    def writer_of_operand(sch: s_tir.Schedule, main, index: int):
        """The block producing the main block's `index`-th input, if one is in the function."""
        buffer = sch.get(main).reads[index].source
        for producer in sch.get_producers(main):
            if any(w.source.same_as(buffer) for w in sch.get(producer).writes):
                return producer
        return None

    @staticmethod
    def one_row_and_column_axis(axes: dict) -> bool:
        """Whether a register tile maps to a rectangle of the output. With rows (or columns)
        from several axes, a tile may straddle two of them, and TVM's region analysis then gets
        the tile's output region wrong; `flatten_epilogue` is tried then, and where it cannot be
        done the epilogue runs after the product."""
        kinds = list(axes["kinds"].values())
        return kinds.count("I") == 1 and kinds.count("J") == 1

    def register_tile(self, sch: s_tir.Schedule, main, axes: dict, lanes: int,
                      panel: int | None = None) -> tuple[int, int]:
        """The tile `panel` columns wide when given (a weight's panels, which the GEMV rule
        reads too); else the first tile whose row count divides the innermost row axis (the
        last when none does, or when it is symbolic)."""
        if panel is not None:
            return next((r, v) for r, v in self.TILES if v * lanes == panel)
        ivs = sch.get(main).iter_vars
        row_extents = [iv.dom.extent for iv in ivs if axes["kinds"][iv.var] == "I"]
        inner = row_extents[-1] if row_extents else None
        cols = 1
        for iv in ivs:
            if axes["kinds"][iv.var] == "J":
                cols = cols * iv.dom.extent.value if isinstance(iv.dom.extent, tirx.IntImm) \
                    and isinstance(cols, int) else None
        fits_cols = [(r, v) for r, v in self.TILES
                     if isinstance(cols, int) and cols % (v * lanes) == 0]
        for rows, vectors in fits_cols:
            if isinstance(inner, tirx.IntImm) and inner.value % rows == 0:
                return rows, vectors
        if fits_cols and not isinstance(inner, tirx.IntImm):  # symbolic M: padded anyway
            return fits_cols[0]
        return self.TILES[-1]

    def k_block(self, k) -> int | None:
        """The K block for a long static K (a divisor near K_BLOCK), else None."""
        if not isinstance(k, int) or k <= self.K_BLOCK * 3 // 2:
            return None
        for block in range(self.K_BLOCK, 63, -16):
            if k % block == 0:
                return block
        return None

    @staticmethod
    def is_under_parallel(sch: s_tir.Schedule, block) -> bool:
        return any(sch.get(loop).kind == tirx.ForKind.PARALLEL for loop in sch.get_loops(block))

    @staticmethod
    def vectorize_tile(sch: s_tir.Schedule, block, lanes: int) -> None:
        loops = sch.get_loops(block)
        *_, row, _col = loops
        common.vectorize_innermost(sch, block, lanes)
        if isinstance(common.extent(sch, row), int):
            sch.unroll(row)


def flatten_epilogue(sch: s_tir.Schedule, main) -> bool:
    """Give the block that consumes the product (its element-wise epilogue, inlined into one)
    the product's iteration space, e.g. (b, s, n) -> (0, b * S + s, n) for an output
    [B, S, N] of rows fused from (b, s). A register tile is then a rectangle of that block
    too. Returns whether it was done."""
    consumers = sch.get_consumers(main)
    if len(consumers) != 1:
        return False
    final = sch.get(consumers[0])
    product = sch.get(main).writes[0].source
    regions = [r for r in final.reads if r.source.same_as(product)]
    if len(regions) != 1 or any(not (isinstance(r.extent, tirx.IntImm) and r.extent.value == 1)
                                for r in regions[0].region):
        return False
    block_vars = [iv.var for iv in final.iter_vars]
    try:
        sch.transform_block_layout(consumers[0], IndexMap(block_vars,
                                                          [r.min for r in regions[0].region],
                                                          None))
    except Exception:  # noqa: BLE001 - not a bijection of the block's domain: keep it as it is
        return False
    return True


def weight_panel_width(n: int, lanes: int) -> int | None:
    """The panel width a weight with `n` columns is stored in (see `panel_layout`): the first
    register tile, in the Matmul rule's order of preference, whose width divides `n`; None when
    none does (the weight stays [K, N])."""
    return next((v * lanes for _, v in Matmul.TILES if n % (v * lanes) == 0), None)


def panel_layout(width: int):
    """[K, N] -> [N / width, K, width]: each panel of `width` columns contiguous over K."""
    return lambda k, n: (n // width, k, n % width)
