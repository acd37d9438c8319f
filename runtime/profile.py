"""Per-kernel time of one artifact function: every VM call is timed through the VM's
instrument hook (on a VM of its own, so other callers are not slowed down)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tvm import relax


@dataclass
class KernelTime:
    name: str
    calls: int
    total_ms: float  # per run of the function

    @property
    def mean_ms(self) -> float:
        return self.total_ms / max(self.calls, 1)


def profile(function, tensors: list, repeat: int = 5) -> tuple[list[KernelTime], float]:
    """Run `function` (a graft.runtime Function) `repeat` times on checked tvm tensors.
    Returns the kernels by time spent (per run, summed over calls) and the run time in ms."""
    vm = relax.VirtualMachine(function.artifact.library, function.artifact.device)
    return profile_vm(vm, function.name, tensors, function._params, repeat)


def profile_vm(vm, function_name: str, tensors: list, params: list,
               repeat: int = 5) -> tuple[list[KernelTime], float]:
    """`profile` on a VM of the caller's (the compiler profiles a module before it is saved)."""
    call = vm[function_name]
    call(*tensors, *params)  # warm-up, untimed
    totals: dict[str, list] = {}
    started: list = []

    def instrument(_func, symbol, before_run, _ret, *_args):
        now = time.perf_counter()
        if before_run:
            started.append(now)
        else:
            entry = totals.setdefault(str(symbol), [0, 0.0])
            entry[0] += 1
            entry[1] += now - started.pop()
        return 0

    vm.set_instrument(instrument)
    start = time.perf_counter()
    for _ in range(repeat):
        call(*tensors, *params)
    run_ms = (time.perf_counter() - start) * 1e3 / repeat
    kernels = [KernelTime(name, calls // repeat, seconds * 1e3 / repeat)
               for name, (calls, seconds) in totals.items()
               if not name.startswith("vm.builtin.")]
    kernels.sort(key=lambda k: -k.total_ms)
    return kernels, run_ms
