"""Model-slimming rewrites and the pass pipeline (see DESIGN.md, "Passes")."""

from graft.passes.pipeline import CompileState, Entry, GraftPass, entry, run_pipeline

__all__ = ["CompileState", "Entry", "GraftPass", "entry", "run_pipeline"]
