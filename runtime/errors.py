"""Errors graft raises on purpose. Each one names what was wrong and what was expected.

They live in graft.runtime so the runtime can raise them without importing the compiler;
`graft.errors` re-exports them.
"""


class GraftError(Exception):
    """Base of every error graft raises on purpose. The CLI prints it as one line."""


class ModelLoadError(GraftError):
    """A model file is missing, truncated or corrupt."""


class UnsupportedOperatorError(GraftError):
    """The model uses operators graft cannot convert."""

    def __init__(self, ops: dict[str, list[str]], how_to_fix: str):
        self.ops = ops
        listed = "; ".join(f"{op} (at {', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})"
                           for op, nodes in sorted(ops.items()))
        super().__init__(f"unsupported operator{'s' if len(ops) > 1 else ''}: {listed}. {how_to_fix}")


class InputSpecError(GraftError):
    """An input spec string or example input is malformed."""


class PassError(GraftError):
    """A pass failed; the message says which, after which passes, and where the dump is."""


class BuildError(GraftError):
    """TVM could not generate code for the module."""


class ArtifactError(GraftError):
    """An artifact directory is missing, incomplete, modified or of another format version."""


class RuntimeInputError(GraftError):
    """Inputs given at run time do not match the artifact's signature."""


class ExecutionError(GraftError):
    """The compiled code refused a call its signature check let through (the function's own
    shape checks), or failed while running."""
