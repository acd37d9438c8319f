"""graft: an ahead-of-time compiler for trained neural networks, on Apache TVM.

    art = graft.compile(model, example_inputs=...)   # torch module, ExportedProgram, .pt2, .onnx
    art.save("build/model")
    rt = graft.load("build/model")                   # graft.runtime; no torch needed
    outputs = rt(*inputs)

Importing graft is cheap: the compiler (torch, onnx) loads on first use of graft.compile.
"""

__version__ = "0.1.0"

from graft.runtime import load  # noqa: E402
from graft.runtime.errors import GraftError  # noqa: E402


def compile(model, example_inputs=None, **options):  # noqa: A001 - the public name
    """Compile a model into an artifact; see graft.driver.compile for the options."""
    from graft.driver import compile as _compile

    return _compile(model, example_inputs, **options)


__all__ = ["compile", "load", "GraftError", "__version__"]
