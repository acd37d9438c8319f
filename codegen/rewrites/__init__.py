"""Relax rewrites that prepare a module for code generation (run by the lowering entries)."""


def shape_dims(expr) -> list | None:
    """The dimensions of a Relax expression's tensor shape, or None when it has none known."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None
