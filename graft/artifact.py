"""Writing an artifact directory atomically (DESIGN.md, "Artifact")."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from graft.runtime.artifact import FORMAT, FORMAT_VERSION, LIBRARY, MANIFEST, PARAMS, sha256_of
from graft.runtime.errors import GraftError


def versions() -> dict:
    import tvm

    import graft

    return {"graft": graft.__version__, "tvm": tvm.__version__,
            "python": platform.python_version()}


def write_artifact(path: str | os.PathLike, executable, params: dict[str, np.ndarray],
                   manifest: dict, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write to a temporary directory beside `path`, then rename it into place.

    A process killed part way leaves only the hidden temporary directory, never a directory at
    `path`; an existing artifact at `path` is replaced only once the new one is complete.
    """
    from safetensors.numpy import save_file

    final = Path(path).resolve()
    if final.exists() and not (final / MANIFEST).is_file():
        raise GraftError(f"output path {str(path)!r} exists and is not a graft artifact; "
                         "refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        executable.export_library(str(staging / LIBRARY))
        save_file({k: np.asarray(v, order="C") for k, v in params.items()},
                  str(staging / PARAMS))
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        files = {}
        for name in sorted(os.listdir(staging)):
            files[name] = {"sha256": sha256_of(staging / name),
                           "bytes": (staging / name).stat().st_size}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_dir(staging)
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, retired / "artifact")
            os.rename(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _fsync_dir(path: Path) -> None:
    for name in os.listdir(path):
        with open(path / name, "rb") as f:
            os.fsync(f.fileno())
