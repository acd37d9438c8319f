"""What the CPU schedule rules share: block queries, inlining, padding and vectorizing helpers."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width


class CPURule(ScheduleRule):
    """A dlight-style rule: `apply(func, target, tunable)` returns a Schedule or None."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"


def blocks(sch: s_tir.Schedule) -> list:
    """The blocks under the root block, in program order."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def single_reduction_block(sch: s_tir.Schedule):
    """The one reduction block of the function (None if there are none or several, or if any
    block is neither spatial nor a reduction)."""
    found = None
    for block in blocks(sch):
        if is_reduction(sch, block):
            if found is not None:
                return None
            found = block
        elif not is_spatial(sch, block):
            return None
    return found


def only_injective_besides(sch: s_tir.Schedule, main) -> bool:
    return all(is_spatial(sch, b) for b in blocks(sch) if sch.get(b) != sch.get(main))


def vector_lanes(target: Target, dtype) -> int:
    """Elements of `dtype` in one vector register of the target (AVX-512: 16 float32)."""
    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // tvm.DataType(str(dtype)).bits, 1)


def num_cores(target: Target) -> int:
    return int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1


def extent(sch: s_tir.Schedule, loop):
    """A loop's extent: an int when static, else the symbolic expression."""
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else value


def pad_factor(sch: s_tir.Schedule, loop, multiple: int) -> int:
    """`multiple` when the loop's extent is symbolic or not a multiple of it, else 1."""
    n = extent(sch, loop)
    return 1 if isinstance(n, int) and n % multiple == 0 else multiple


def chunk_count(sch: s_tir.Schedule, loop, tile: int, chunk: int) -> int:
    """How many tiles make a chunk: about `chunk` elements and a divisor of the loop's tile
    count, so the split needs no tail predicate (1 for a symbolic extent, for the same reason)."""
    n = extent(sch, loop)
    if not isinstance(n, int):
        return 1
    tiles = -(-n // tile)
    count = min(max(chunk // tile, 1), tiles)
    while tiles % count:
        count -= 1
    return count


def _reachable(sch: s_tir.Schedule, block, step) -> list:
    """Blocks reachable from `block` by repeating `step` (get_consumers or get_producers),
    nearest first."""
    seen, order, queue = set(), [], list(step(block))
    while queue:
        b = queue.pop(0)
        key = sch.get(b).name_hint
        if key in seen:
            continue
        seen.add(key)
        order.append(b)
        queue.extend(step(b))
    return order


def transitive_consumers(sch: s_tir.Schedule, block) -> list:
    return _reachable(sch, block, sch.get_consumers)


def _inline_all(sch: s_tir.Schedule, block, step) -> None:
    """compute_inline every block reachable by `step` that allows it, until none does."""
    changed = True
    while changed:
        changed = False
        for other in _reachable(sch, block, step):
            try:
                sch.compute_inline(other)
                changed = True
                break
            except Exception:  # noqa: BLE001 - not inlinable (it writes an output): keep it
                continue


def inline_epilogue(sch: s_tir.Schedule, block) -> None:
    """Inline every element-wise block after `block` into the one that writes the output."""
    _inline_all(sch, block, sch.get_consumers)


def inline_producers(sch: s_tir.Schedule, block) -> None:
    """Inline every element-wise block before `block` into its consumers."""
    _inline_all(sch, block, sch.get_producers)


def inline_producers_keeping_gemm(sch: s_tir.Schedule, block) -> None:
    """Inline the element-wise blocks before `block` that leave it a two-operand product
    (`gemm_axes` form); a block expanding a packed weight from several arrays stays."""
    changed = True
    while changed:
        changed = False
        for other in _reachable(sch, block, sch.get_producers):
            trial = sch.copy()
            try:
                trial.compute_inline(other)
            except Exception:  # noqa: BLE001 - not inlinable: keep it
                continue
            if gemm_axes(trial.get(block)) is not None:
                sch.compute_inline(other)
                changed = True
                break


def write_back_with_epilogue(sch: s_tir.Schedule, main, at, fuse_epilogue: bool = True):
    """Accumulate `main`'s output in registers, written back under loop `at`; with
    `fuse_epilogue`, the element-wise epilogue is computed there too, on the values still in
    registers. Returns the block that writes the function's output under `at`."""
    registers = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(registers, at, preserve_unit_loops=True)
    if not (fuse_epilogue and sch.get_consumers(registers)):
        return registers
    try:  # on a copy first: a failure half-way would leave the write-back inlined
        _fuse_into_write_back(sch.copy(), main, registers, at)
    except Exception:  # noqa: BLE001 - keep the write-back; the epilogue follows it
        return registers
    return _fuse_into_write_back(sch, main, registers, at)


def _fuse_into_write_back(sch: s_tir.Schedule, main, registers, at):
    inline_epilogue(sch, registers)
    sch.compute_inline(registers)
    final = transitive_consumers(sch, main)[-1]
    # the epilogue's other element-wise inputs (a slice of an operand, say) are computed in it
    for producer in sch.get_producers(final):
        if not sch.get(producer).same_as(sch.get(main)):
            sch.compute_inline(producer)
    sch.reverse_compute_at(final, at, preserve_unit_loops=True)
    return final


def loop_of_reduction(sch: s_tir.Schedule, block):
    """The loop that drives the block's (first) reduction iterator."""
    return loop_of_iter(sch, block, lambda iv: iv.iter_type == tirx.IterVar.CommReduce)


def loop_of_iter(sch: s_tir.Schedule, block, wanted):
    """The loop that drives the first block iterator for which wanted(iter_var) holds."""
    from tvm_ffi import get_global_func

    realize = get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    for iv, value in zip(sch.get(block).iter_vars, realize.iter_values):
        if wanted(iv):
            used = tirx.analysis.undefined_vars(value)
            for loop in sch.get_loops(block):
                if any(sch.get(loop).loop_var.same_as(v) for v in used):
                    return loop
    return None


def vector_width(n, lanes: int) -> int:
    """The widest power of two up to `lanes` dividing a static extent n; 1 for symbolic n
    (a vector loop with a tail predicate is scalarized by TVM; LLVM vectorizes plain loops)."""
    if not isinstance(n, int):
        return 1
    width = lanes
    while width > 1 and n % width:
        width //= 2
    return width


def vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorize the block's innermost loop in whole vectors, without a tail."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    n = extent(sch, inner)
    width = vector_width(n, lanes)
    if width <= 1:
        return
    if n == width:
        sch.vectorize(inner)
        return
    _, vec = sch.split(inner, [None, width])
    sch.vectorize(vec)


SMALL_KERNEL = 8192  # elements; fewer run on one thread (waking the pool costs more)


def static_size(sch: s_tir.Schedule, loops) -> int | None:
    """The product of the loops' extents; None if any is symbolic."""
    total = 1
    for loop in loops:
        n = extent(sch, loop)
        if not isinstance(n, int):
            return None
        total *= n
    return total


PARALLEL_TASKS = 64  # outer iterations enough to balance the threads of any core count here


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Run a spatial block's outer loops in parallel (unless the block is small) and vectorize
    its innermost loop. Only the shortest prefix of the outer loops whose static extents make
    PARALLEL_TASKS iterations is fused into the parallel loop (a symbolic extent counts as 1:
    it may be 1 at run time); the rest stay serial inside it. Fusing them all would make every
    vector recover its indices by a division and a remainder per loop, by run-time divisors
    where an extent is symbolic (measured: a stack of 30 KV caches of symbolic length, 2.4 ms
    a call that way, 0.5 ms with the length a serial loop)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    size = static_size(sch, loops)
    vectorize_innermost(sch, block, lanes)
    loops = sch.get_loops(block)
    outer = loops[:-1] if len(loops) > 1 else []
    if not outer or (size is not None and size < SMALL_KERNEL):
        return
    count, prefix = 1, 0
    while prefix < len(outer) and count < PARALLEL_TASKS:
        n = extent(sch, outer[prefix])
        count *= n if isinstance(n, int) else 1
        prefix += 1
    parallel = outer[:prefix]
    sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])


def gemm_axes(block) -> dict | None:
    """Classify a two-input reduction block C[...] += A[...] * B[...] by iterator:
    "S" (in A, B and C), "I" (A and C), "J" (B and C), "K" (reduced, in A and B) and "T"
    (extent 1). None when the block is not of that form."""
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None

    def axes(region):
        found = set()
        for r in region:
            if not (isinstance(r.extent, tirx.IntImm) and r.extent.value == 1):
                return None
            found |= {v for v in tirx.analysis.undefined_vars(r.min)}
        return found

    a, b, c = axes(block.reads[0].region), axes(block.reads[1].region), axes(block.writes[0].region)
    if a is None or b is None or c is None:
        return None
    kinds = {}
    for iv in block.iter_vars:
        var, n = iv.var, iv.dom.extent
        if isinstance(n, tirx.IntImm) and n.value == 1:
            kind = "T"
        elif iv.iter_type == tirx.IterVar.DataPar:
            kind = {(1, 1, 1): "S", (1, 0, 1): "I", (0, 1, 1): "J"}.get((var in a, var in b, var in c))
        elif iv.iter_type == tirx.IterVar.CommReduce:
            kind = "K" if var in a and var in b and var not in c else None
        else:
            kind = None
        if kind is None:
            return None
        kinds[var] = kind
    return {"kinds": kinds, "a": a, "b": b, "c": c}


def fusion_map(iter_vars, kinds: dict, order: str) -> tirx.IndexMap:
    """An index map fusing the iterators of each kind into one axis, axes in `order`."""
    inputs, fused = [], {}
    for i, iv in enumerate(iter_vars):
        var = tirx.Var(f"i{i}", iv.dom.extent.ty)
        inputs.append(var)
        kind = kinds[iv.var]
        if kind == "T" or kind not in order:
            continue
        fused[kind] = fused[kind] * iv.dom.extent + var if kind in fused else var
    zero = tirx.IntImm(iter_vars[0].dom.extent.ty, 0)
    return tirx.IndexMap(inputs, [fused.get(kind, zero) for kind in order], None)


def b_contiguous_along_j(block, axes: dict) -> bool:
    """Whether B's innermost index is a J iterator (so a row of B is a vector of outputs)."""
    inner = block.reads[1].region[-1].min
    return isinstance(inner, tirx.Var) and axes["kinds"].get(inner) == "J"


def normalize_gemm(sch: s_tir.Schedule, block, rows: bool) -> tuple:
    """Bring a gemm-form block to C[S, I, J] += A[S, I, K] * B[S, J, K] (or, with rows=False,
    C[S, J] += A[S, K] * B[S, J, K]) through reindexed copies of its operands, which are
    returned (read A, read B, write C) so the caller can inline or keep them."""
    stmt = sch.get(block)
    axes = gemm_axes(stmt)
    kinds, ivs = axes["kinds"], list(stmt.iter_vars)
    orders = ("SIJK", "SIK", "SJK", "SIJ") if rows else ("SJK", "SK", "SJK", "SJ")

    def buffer_map(present, order):
        return fusion_map([iv for iv in ivs if iv.var in present], kinds, order)

    maps = (buffer_map({iv.var for iv in ivs}, orders[0]), buffer_map(axes["a"], orders[1]),
            buffer_map(axes["b"], orders[2]), buffer_map(axes["c"], orders[3]))
    read_a = sch.reindex(block, ("read", 0))
    read_b = sch.reindex(block, ("read", 1))
    write_c = sch.reindex(block, ("write", 0))
    sch.transform_layout(read_a, ("write", 0), maps[1])
    sch.transform_layout(read_b, ("write", 0), maps[2])
    sch.transform_layout(write_c, ("read", 0), maps[3])
    sch.transform_block_layout(block, maps[0])
    return read_a, read_b, write_c


# Blocks with this annotation copy a weight into the layout a kernel wants; after scheduling,
# SplitLayoutRewritePreproc moves them into functions of their own and FoldWeightLayouts runs
# those once, at compile time (see `codegen/rewrites/fold_weight_layouts.py`)
LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"


def weight_read(sch: s_tir.Schedule, block, index: int):
    """The buffer of `block`'s `index`-th read when it is a 2-D weight the function takes as
    it is (a parameter in the function's `layout_free_buffers`), in the dtype the block
    computes in, else None. (A quantized weight keeps its format's own layout.)"""
    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    buffer = sch.get(block).reads[index].source
    if free is None or len(buffer.shape) != 2 or \
            buffer.dtype != sch.get(block).writes[0].source.dtype:
        return None
    return buffer if any(func.params[int(i)].same_as(buffer) for i in free) else None


def pack_weight(sch: s_tir.Schedule, block, index: int, layout) -> None:
    """Copy `block`'s `index`-th read (a weight) into `layout` (an index map of its 2-D
    indices), as a layout rewrite done once at compile time instead of at every call."""
    packed = sch.cache_read(block, index, "global")
    sch.transform_layout(packed, ("write", 0), tirx.IndexMap.from_func(layout))
    sch.annotate(packed, LAYOUT_REWRITE, 1)
