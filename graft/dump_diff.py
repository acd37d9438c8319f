"""`graft diff A B`: what changed between two dumped steps (see DESIGN.md, "Dumps").

A and B are dump files (`dumps/017_fuse_ops.py`), a dump directory and a step in it
(`dumps/017` or `dumps/fuse_ops`), or a dump directory alone (its last step: two compiles of one
model side by side). Printed: the functions added and removed, each Relax function's inputs
and outputs that changed, the calls by kind whose counts changed (Relax ops, kernels), the
parameters (weights) added, removed or reshaped, and a line diff of each changed Relax function.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections import Counter
from pathlib import Path

from graft.runtime.errors import GraftError

_STEP_FILE = re.compile(r"^(\d{3})_(.+)\.py$")


def resolve(spec: str) -> Path:
    """The dump file a command-line argument names."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        steps = _steps(path)
        if not steps:
            raise GraftError(f"{spec!r} holds no dumped steps (NNN_<pass>.py files)")
        return steps[-1]
    parent, wanted = path.parent, path.name
    if parent.is_dir():
        matches = [p for p in _steps(parent)
                   if _STEP_FILE.match(p.name).group(1) == wanted.zfill(3)
                   or _STEP_FILE.match(p.name).group(2) == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise GraftError(f"{spec!r} names several steps ({', '.join(p.name for p in matches)});"
                             " give the number")
        steps = ", ".join(p.name for p in _steps(parent)[:6])
        raise GraftError(f"no step {wanted!r} in dump directory {str(parent)!r}"
                         f"{f' (it has {steps}, ...)' if steps else ''}")
    raise GraftError(f"{spec!r} is not a dump file, a dump directory, or DIR/STEP")


def _steps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _STEP_FILE.match(p.name))


def load(path: Path):
    import tvm

    try:
        return tvm.script.from_source(path.read_text())
    except Exception as err:  # TVM's parser raises its own error types
        first = str(err).strip().splitlines()
        raise GraftError(f"{str(path)!r} does not parse as a dumped module: "
                         f"{first[0] if first else type(err).__name__}") from None


def diff(path_a: Path, path_b: Path, max_lines: int = 60, color: bool = False) -> str:
    from tvm import relax, tirx

    from graft.ir import stats

    mod_a, mod_b = load(path_a), load(path_b)
    out = [_paint(f"{path_a} -> {path_b}", "1", color)]
    funcs_a = {gv.name_hint: f for gv, f in mod_a.functions_items()}
    funcs_b = {gv.name_hint: f for gv, f in mod_b.functions_items()}

    def kinds(funcs):
        return Counter("TIR" if isinstance(f, tirx.PrimFunc) else "Relax" for f in funcs.values())

    ka, kb = kinds(funcs_a), kinds(funcs_b)
    out.append(f"functions: {ka['Relax']} Relax, {ka['TIR']} TIR -> {kb['Relax']} Relax, "
               f"{kb['TIR']} TIR")
    added = sorted(set(funcs_b) - set(funcs_a))
    removed = sorted(set(funcs_a) - set(funcs_b))
    for sign, names, funcs in (("+", added, funcs_b), ("-", removed, funcs_a)):
        if names:
            shown = ", ".join(f"{n} ({'TIR' if isinstance(funcs[n], tirx.PrimFunc) else 'Relax'})"
                              for n in names[:12])
            more = f", and {len(names) - 12} more" if len(names) > 12 else ""
            out.append(_paint(f"  {sign} {shown}{more}", "32" if sign == "+" else "31", color))

    counts_a, counts_b = stats.op_counts(mod_a), stats.op_counts(mod_b)
    changed = [(k, counts_a.get(k, 0), counts_b.get(k, 0)) for k in sorted(set(counts_a) |
                                                                         set(counts_b))
               if counts_a.get(k, 0) != counts_b.get(k, 0)]
    if changed:
        out.append("calls by kind (outside fused functions):")
        width = max(len(k) for k, _, _ in changed)
        for kind, before, after in sorted(changed, key=lambda c: -abs(c[2] - c[1])):
            out.append(_paint(f"  {kind:<{width}}  {before:5d} -> {after:<5d} ({after - before:+d})",
                              "32" if after > before else "31", color))
    else:
        out.append("calls by kind: unchanged")

    for name in sorted(set(funcs_a) & set(funcs_b)):
        fa, fb = funcs_a[name], funcs_b[name]
        if not (isinstance(fa, relax.Function) and isinstance(fb, relax.Function)) or \
                stats._is_primitive(fb):
            continue
        params_a, params_b = _params(fa), _params(fb)
        if params_a != params_b or _ret(fa) != _ret(fb):
            out.append(f"{name}: signature changed")
            out += _changed_params(params_a, params_b, color)
            if _ret(fa) != _ret(fb):
                out.append(_paint(f"  - returns {_ret(fa)}", "31", color))
                out.append(_paint(f"  + returns {_ret(fb)}", "32", color))
        lines_a, lines_b = fa.script().splitlines(), fb.script().splitlines()
        delta = [line for line in difflib.unified_diff(lines_a, lines_b, lineterm="", n=1)
                 if not line.startswith(("---", "+++"))]
        if not delta:
            continue
        out.append(f"{name}: {sum(1 for d in delta if d.startswith('-'))} lines out, "
                   f"{sum(1 for d in delta if d.startswith('+'))} lines in"
                   + (f" (the first {max_lines} shown; --lines N for more)"
                      if len(delta) > max_lines else ""))
        for line in delta[:max_lines]:
            code = "32" if line.startswith("+") else "31" if line.startswith("-") else \
                "36" if line.startswith("@@") else ""
            out.append(_paint(f"  {line}", code, color))
    if not (added or removed or changed or any(line.startswith(tuple(funcs_b)) for line in out[2:])):
        out.append("no changes")
    return "\n".join(out)


def _params(func) -> dict:
    return {p.name: _type(p) for p in func.params}


def _type(expr) -> str:
    return _type_of(expr.ty)


def _type_of(sinfo) -> str:
    from tvm import relax, tirx

    if isinstance(sinfo, relax.TensorType):
        if not isinstance(sinfo.shape, relax.ShapeExpr):
            return f"? {sinfo.dtype}"
        dims = [str(d.value) if isinstance(d, tirx.IntImm) else str(d) for d in sinfo.shape.values]
        return f"{'x'.join(dims) or 'scalar'} {sinfo.dtype}"
    if isinstance(sinfo, relax.TupleType):
        return "(" + ", ".join(_type_of(f) for f in sinfo.fields) + ")"
    return type(sinfo).__name__


def _ret(func) -> str:
    return _type_of(func.ret_ty)


def _changed_params(before: dict, after: dict, color: bool) -> list[str]:
    lines = []
    for name in before:
        if name not in after:
            lines.append(_paint(f"  - {name}: {before[name]}", "31", color))
        elif before[name] != after[name]:
            lines.append(_paint(f"  ~ {name}: {before[name]} -> {after[name]}", "33", color))
    for name in after:
        if name not in before:
            lines.append(_paint(f"  + {name}: {after[name]}", "32", color))
    return lines


def _paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color and code else text


def main(a: str, b: str, max_lines: int) -> int:
    print(diff(resolve(a), resolve(b), max_lines, color=sys.stdout.isatty()))
    return 0
