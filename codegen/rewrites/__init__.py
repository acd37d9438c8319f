"""Relax rewrites that prepare a module for code generation (run by the lowering entries)."""
