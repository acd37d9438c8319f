"""Relax rewrites that prepare a module for code generation (run by the lowering entries)."""


def shape_dims(expr) -> list | None:
    """The dimensions of a Relax expression's tensor shape, or None when it has none known."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def provably_equal(a, b) -> bool:
    """Whether two shape dimensions (ints or symbolic expressions) are provably equal."""
    import tvm

    return tvm.sym.Analyzer().can_prove_equal(a, b)


def replace_functions(mod, updates: dict):
    """`mod` with the functions in `updates` (global var -> function) replaced; `mod` itself
    when there are none."""
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def mutate_relax_functions(mutator, mod):
    """Every Relax function of `mod` through `mutator` (a relax.PyExprMutator built on `mod`);
    the mutator's module, with any functions it added."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
