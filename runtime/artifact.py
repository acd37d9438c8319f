"""Reading and verifying an artifact directory (see DESIGN.md, "Artifact")."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from graft.runtime.errors import ArtifactError

FORMAT = "graft-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.safetensors"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check an artifact's manifest and files: format version, names, SHA-256."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"artifact {str(root)!r} does not exist")
    if not root.is_dir():
        raise ArtifactError(f"artifact {str(root)!r} is not a directory: an artifact is the "
                            "directory that `graft compile -o` writes")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"artifact {str(root)!r} has no {MANIFEST}: not a graft artifact, "
                            "or an incomplete one")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not a graft manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact {str(root)!r} has format version {version}, this graft "
                            f"reads version {FORMAT_VERSION}: recompile the model with this graft")
    files = manifest.get("files")
    if not isinstance(files, dict) or LIBRARY not in files or PARAMS not in files:
        raise ArtifactError(f"{manifest_path} does not list {LIBRARY} and {PARAMS} under \"files\"")
    real_root = root.resolve()
    for name, entry in files.items():
        file_path = _inside(real_root, name, manifest_path)
        if not file_path.is_file():
            raise ArtifactError(f"artifact file {name!r} is missing from {str(root)!r}")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        actual = sha256_of(file_path)
        if actual != expected:
            raise ArtifactError(f"artifact file {name!r} in {str(root)!r} was modified: its SHA-256 "
                                f"is {actual[:16]}..., the manifest says {str(expected)[:16]}...; "
                                "refusing to load it")
    _check_functions(manifest, manifest_path)
    return manifest


def _check_functions(manifest: dict, manifest_path: Path) -> None:
    """The entry points' signatures are what the runtime checks inputs against: refuse any
    that is not well formed rather than fail later on a call."""
    from graft.runtime.signature import DTYPES, OBJECT

    functions = manifest.get("functions")
    if not isinstance(functions, dict) or not functions:
        raise ArtifactError(f"{manifest_path} lists no functions (expected \"functions\": "
                            "{name: {inputs, outputs, params}})")
    for name, sig in functions.items():
        where = f"{manifest_path}: function {name!r}"
        if not isinstance(sig, dict):
            raise ArtifactError(f"{where} is not an object with inputs, outputs and params")
        for part in ("inputs", "outputs"):
            specs = sig.get(part)
            if not isinstance(specs, list):
                raise ArtifactError(f"{where} has no list of {part}")
            for spec in specs:
                ok = (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                      and spec.get("dtype") in (*DTYPES, OBJECT)
                      and isinstance(spec.get("shape"), list)
                      and all((isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                              or (isinstance(d, str) and d.strip() and d.isprintable())
                              for d in spec["shape"]))
                if not ok:
                    raise ArtifactError(f"{where}: {part} entry {spec!r} is not a tensor spec "
                                        "(name, a shape of sizes and symbolic dims such as "
                                        "'batch' or 'past_len + new_tokens', a dtype graft "
                                        "knows)")
        params = sig.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ArtifactError(f"{where} has no list of parameter names")
        nonzero = sig.get("nonzero_inputs", {})
        if not isinstance(nonzero, dict) or not all(isinstance(v, str) for v in nonzero.values()):
            raise ArtifactError(f"{where}: \"nonzero_inputs\" is not an object of input names "
                                "and reasons")


def _inside(real_root: Path, name: str, manifest_path: Path) -> Path:
    """The path of an artifact file, refusing names that leave the artifact directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ArtifactError(f"{manifest_path} names file {name!r}: artifact files must be plain "
                            "names inside the artifact directory")
    path = (real_root / name).resolve()
    if path.parent != real_root:
        raise ArtifactError(f"{manifest_path} names file {name!r}, which resolves outside the "
                            "artifact directory; refusing to load it")
    return path


def read_safetensors(path: str | os.PathLike, copy=None) -> dict:
    """The tensors of a safetensors file as numpy arrays over a memory map of it (no torch
    needed, no copy). With `copy`, each array is handed to it and its result is kept instead;
    then the map's pages of each tensor are given back to the OS once it has been copied, so
    loading holds about one copy of the parameters at any time instead of two (the file's pages
    would otherwise stay resident beside the copies)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
    try:
        import ml_dtypes
        dtypes["BF16"] = ml_dtypes.bfloat16
        dtypes["F8_E4M3"] = ml_dtypes.float8_e4m3fn
        dtypes["F8_E5M2"] = ml_dtypes.float8_e5m2
    except ImportError:
        pass
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    lead = (8 + header_len) % mmap.ALLOCATIONGRANULARITY  # where `data` starts in its mapping
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] not in dtypes:
            raise ArtifactError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this "
                                "runtime cannot read (install ml_dtypes for bfloat16/float8)")
        array = data[begin:end].view(dtypes[info["dtype"]]).reshape(info["shape"])
        if copy is None:
            arrays[name] = array
            continue
        arrays[name] = copy(array)
        _give_back(getattr(data, "_mmap", None), lead + begin, lead + end)
    return arrays


def _give_back(mapping, begin: int, end: int) -> None:
    """madvise(DONTNEED) the whole pages of [begin, end) of a read-only file mapping: they are
    read from the file again if touched."""
    page, advice = mmap.PAGESIZE, getattr(mmap, "MADV_DONTNEED", None)
    start, stop = -(-begin // page) * page, end // page * page
    if stop > start and advice is not None and hasattr(mapping, "madvise"):
        mapping.madvise(advice, start, stop - start)
