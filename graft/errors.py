"""graft's error types (defined in graft.runtime, which must not depend on the compiler)."""

from graft.runtime.errors import (  # noqa: F401
    ArtifactError,
    BuildError,
    GraftError,
    InputSpecError,
    ModelLoadError,
    PassError,
    RuntimeInputError,
    UnsupportedOperatorError,
)
