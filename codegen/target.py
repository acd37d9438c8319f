"""Targets: this host's CPU (with its real -mcpu), CUDA, or a TVM target dict."""

from __future__ import annotations

import os

import tvm

from graft.runtime.errors import GraftError

DEFAULT_CUDA_ARCH = "sm_90"  # used when no GPU is visible at compile time (H100/H200)


def host_cpu_target() -> dict:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return {"kind": "llvm", "mcpu": cpu, "num-cores": len(os.sched_getaffinity(0))}


def cuda_target() -> dict:
    arch = DEFAULT_CUDA_ARCH
    try:
        dev = tvm.cuda(0)
        if dev.exist:
            arch = "sm_" + dev.compute_version.replace(".", "")
    except Exception:  # no CUDA runtime here: build for the default arch
        pass
    return {"kind": "cuda", "arch": arch, "host": host_cpu_target()}


def resolve_target(target) -> tvm.target.Target:
    """"cpu" (this host), "cuda", a TVM target dict, or a tvm.target.Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if target in (None, "cpu", "llvm"):
        spec = host_cpu_target()
    elif target == "cuda":
        spec = cuda_target()
    elif isinstance(target, dict):
        spec = target
    else:
        raise GraftError(f"unknown target {target!r}: expected 'cpu', 'cuda' or a TVM target dict "
                         "such as {'kind': 'llvm', 'mcpu': 'znver4'}")
    try:
        return tvm.target.Target(spec)
    except Exception as err:
        raise GraftError(f"TVM refuses target {spec}: {str(err).strip().splitlines()[0]}") from None


def device_kind(target: tvm.target.Target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"


def target_json(target: tvm.target.Target) -> dict:
    """The target as a plain dict for the manifest."""
    import json

    return json.loads(str(target)) if str(target).startswith("{") else {"target": str(target)}
