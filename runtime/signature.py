"""Input and output signatures: names, shapes with symbolic dims, dtypes.

A shape is a list of dims; a dim is an int or a name (a symbolic dim, e.g. "batch").
Written as text, a spec is `NAME:SHAPE:DTYPE` with SHAPE like `8x128` or `batchx128`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from graft.runtime.errors import InputSpecError

_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

OBJECT = "object"  # the dtype of a non-tensor input (a KV cache object)
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
          "uint8", "uint16", "uint32", "uint64", "bool",
          "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


@dataclass
class TensorSpec:
    name: str
    shape: list = field(default_factory=list)  # ints and symbolic dim names
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: dict) -> "TensorSpec":
        return cls(obj["name"], list(obj["shape"]), obj["dtype"])

    def shape_text(self) -> str:
        return format_shape(self.shape)

    def __str__(self) -> str:
        if self.dtype == OBJECT:
            return f"{self.name}:{self.dtype}"
        return f"{self.name}:{self.shape_text()}:{self.dtype}"


def format_shape(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def parse_shape(text: str) -> list:
    """`8x128`, `batchx128`, or with commas (`batch,max_len`) when a name contains an 'x'."""
    text = text.strip()
    if text in ("", "scalar"):
        return []
    dims = []
    for part in text.split(",") if "," in text else text.split("x"):
        part = part.strip()
        if part.isdigit():
            dims.append(int(part))
        elif _DIM_NAME.match(part):
            dims.append(part)
        else:
            raise InputSpecError(f"bad dim {part!r} in shape {text!r}: expected integers or names "
                                 "separated by 'x' (8x128, batchx128) or by ',' (batch,max_len)")
    return dims


def parse_spec(text: str) -> TensorSpec:
    """Parse `NAME:SHAPE:DTYPE` (DTYPE defaults to float32)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise InputSpecError(f"bad input spec {text!r}: expected NAME:SHAPE:DTYPE, "
                             "e.g. input_ids:batchx128:int64")
    dtype = parts[2] if len(parts) == 3 else "float32"
    if dtype not in DTYPES:
        raise InputSpecError(f"bad dtype {dtype!r} in input spec {text!r}: expected one of "
                             f"{', '.join(DTYPES)}")
    return TensorSpec(parts[0], parse_shape(parts[1]), dtype)


def random_inputs(specs: list, dims: dict, seed: int = 0) -> list:
    """Arrays for `specs` to time or profile a function with: integers 0 or 1 (valid indices
    and masks), floats standard normal; a symbolic dim takes its size from `dims`, else 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = [d if isinstance(d, int) else dims.get(d, 1) for d in spec.shape]
        arrays.append((rng.integers(0, 2, shape) if spec.dtype.startswith(("int", "uint"))
                       else rng.standard_normal(shape)).astype(spec.dtype))
    return arrays
