"""Targets, lowering and scheduling of TIR kernels, and building the library."""
