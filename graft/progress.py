"""Progress lines for long work, shown only when stderr is a terminal (quiet in logs and CI)."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

# the CLI compiles in a child process; the child writes each step it starts to this file, so
# that the parent can say where a crash happened (see graft.cli)
STAGE_FILE = "GRAFT_STAGE_FILE"
PROGRESS = "GRAFT_PROGRESS"  # "1" or "0": on or off, whatever stderr is

_forced: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force progress on or off; None means: on when stderr is a terminal."""
    global _forced
    _forced = enabled


def enabled() -> bool:
    if _forced is not None:
        return _forced
    inherited = os.environ.get(PROGRESS)  # set for the CLI's compile child by its parent
    return inherited == "1" if inherited in ("0", "1") else sys.stderr.isatty()


def note(text: str) -> None:
    if enabled():
        print(f"graft: {text}", file=sys.stderr, flush=True)


@contextmanager
def step(text: str):
    """`graft: <text> ...` then ` done (1.2 s)` when the work ends."""
    start = time.perf_counter()
    _record_stage(text)
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


def _record_stage(text: str) -> None:
    path = os.environ.get(STAGE_FILE)
    if path:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError:
            pass
