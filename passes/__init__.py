"""Model-slimming rewrites and the pass pipeline (see DESIGN.md, "Passes")."""

from graft.passes.early_exit import EarlyExit, reduce_depth
from graft.passes.kv_share import ShareKV
from graft.passes.paged_kv import PagedKV
from graft.passes.pipeline import CompileState, Entry, GraftPass, entry, run_pipeline
from graft.passes.quantize import Quantize
from graft.passes.sparsify import Sparsify

__all__ = ["CompileState", "EarlyExit", "Entry", "GraftPass", "PagedKV", "Quantize", "ShareKV", "Sparsify",
           "entry", "reduce_depth", "run_pipeline"]
