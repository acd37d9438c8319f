"""MarkInjectiveKernels: kernels that only move data are marked injective, so FuseOps can fuse
them with their neighbours.

TVM's op pattern analysis gives up on some plain copies when a shape is symbolic: `take` of a
cache layer (`past_k[i]`) and `concatenate` along a symbolic axis come out kOpaque, so a decode
step copies every layer's past keys and values twice (take, then concatenate). A kernel whose
body is one spatial block that writes its output exactly at its iteration point (each output
element once, nothing reduced) is injective by definition; this pass says so for those that
select or gather among several inputs (a take reads the table and the index).

Left alone: copies of one input (reshape, slice, transpose), whose marking made MiniLM's
symbolic-shape compile take 30 s instead of 7 s (large fused index arithmetic) for no gain; and
gathers by a vector of indices (embedding lookups, graft's int4 gather), since FuseTIR cannot
merge a kernel that declares its own symbolic length for the indices with the one producing
them.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from graft.codegen.cpu import common
from graft.codegen.rewrites import replace_functions

OPAQUE, INJECTIVE = 8, 2


def _single_block(func: tirx.PrimFunc):
    """The one block under the root of `func`, or None."""
    try:
        sch = s_tir.Schedule(func)
        found = common.blocks(sch)
    except Exception:  # noqa: BLE001 - not schedulable TIR (e.g. written with raw buffers)
        return None
    return sch.get(found[0]) if len(found) == 1 else None


def is_injective_copy(func: tirx.PrimFunc) -> bool:
    block = _single_block(func)
    if block is None or len(block.writes) != 1 or block.init is not None:
        return False
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars):
        return False
    if len(block.reads) < 2:
        return False  # a reshape, slice or transpose of one input (see the module docstring)
    if any(str(r.source.dtype).startswith(("int", "uint")) and len(r.source.shape) > 0
           for r in block.reads):
        return False  # a gather by a vector of indices (an embedding lookup): left as it is
    written = block.writes[0]
    index = [r.min for r in written.region]
    return len(index) == len(block.iter_vars) and all(
        isinstance(i, tirx.Var) and i.same_as(iv.var) for i, iv in zip(index, block.iter_vars))


@tvm.transform.module_pass(opt_level=0, name="MarkInjectiveKernels")
class MarkInjectiveKernels:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {gv: func.with_attr("op_pattern", INJECTIVE)
                   for gv, func in mod.functions_items()
                   if isinstance(func, tirx.PrimFunc) and func.attrs is not None
                   and int(func.attrs.get("op_pattern", -1)) == OPAQUE
                   and is_injective_copy(func)}
        return replace_functions(mod, updates)
