"""Progress lines for long work, shown only when stderr is a terminal (quiet in logs and CI)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_forced: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force progress on or off; None means: on when stderr is a terminal."""
    global _forced
    _forced = enabled


def enabled() -> bool:
    return _forced if _forced is not None else sys.stderr.isatty()


def note(text: str) -> None:
    if enabled():
        print(f"graft: {text}", file=sys.stderr, flush=True)


@contextmanager
def step(text: str):
    """`graft: <text> ...` then ` done (1.2 s)` when the work ends."""
    start = time.perf_counter()
    if enabled():
        print(f"graft: {text} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if enabled():
            print(" failed", file=sys.stderr, flush=True)
        raise
    if enabled():
        print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


@contextmanager
def quiet():
    """No progress lines inside (work nested in a step that reports for it)."""
    global _forced
    saved = _forced
    _forced = False
    try:
        yield
    finally:
        _forced = saved


def count(text: str, done: int, total: int) -> None:
    """`graft: <text> done/total`, rewritten in place on a terminal; a newline at the end."""
    if enabled():
        end = "\n" if done >= total else ""
        print(f"\rgraft: {text} {done}/{total}", end=end, file=sys.stderr, flush=True)
