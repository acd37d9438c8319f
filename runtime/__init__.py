"""graft's runtime: loads a verified artifact and runs it. Imports only tvm, numpy and the
standard library (never torch, onnx or onnxruntime).

Loading an artifact runs the code in its model.so: load only artifacts you trust.
"""

from graft.runtime.errors import ArtifactError, GraftError, RuntimeInputError
from graft.runtime.signature import TensorSpec


def load(path, num_threads: int | None = None):
    """Load an artifact directory written by `graft compile` / `graft.compile(...).save(...)`;
    returns a `graft.runtime.session.Artifact`.

    num_threads: CPU threads for the kernels (default: GRAFT_NUM_THREADS, else every core).
    The thread pool is per process: the last count set applies to every loaded artifact."""
    from graft.runtime.session import Artifact, configure_threads

    if num_threads is not None:
        configure_threads(num_threads)
    return Artifact(path)


def __getattr__(name):  # TVM loads on first use, so `import graft` (and `graft --help`) is quick
    if name in ("Artifact", "Function", "configure_threads"):
        from graft.runtime import session

        return getattr(session, name)
    raise AttributeError(f"module 'graft.runtime' has no attribute {name!r}")


__all__ = ["load", "Artifact", "Function", "TensorSpec", "configure_threads", "GraftError",
           "ArtifactError", "RuntimeInputError"]
