"""Rewrites of an ExportedProgram's graph before TVM imports it, for patterns TVM's importer
gets wrong."""


def apply(ep):
    return ep
