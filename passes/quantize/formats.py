"""Packed weight formats: the numpy quantizers, their exact numpy inverses, and the TIR kernels
that expand them (see DESIGN.md, "Passes").

A linear layer's weight W [N out, K in] is stored in layouts the CPU kernels stream, where a
row of K is a vector of outputs:

- fp16: `q` float16 [K, N]; w = float32(q) (storage only: products stay float32).
- int8, per output channel, symmetric: `q` int8 [K, N], `scale` float32 [N];
  w = q * scale.
- int4, group-wise along K (the reduction axis), two values per byte: `q` uint8
  [N/64, K, 32] (tiles of 64 output columns, each contiguous over all of K, so a task that
  owns a tile streams one run of memory; row by row, [K, N/2] costs a new page per row),
  `scale` float32 [K/G, N] and, unless symmetric, `offset` float32 [K/G, N];
  w = q4 * scale + offset (asymmetric, q4 in 0..15; an offset per group is a zero point kept in
  float, as GGUF's Q4_1 does) or w = (q4 - 8) * scale (symmetric).
  Nibble order, per block of 32 columns: byte i of the block holds column i in its low nibble
  and column 16 + i in its high one, so 16 bytes expand into two whole vectors of 16 outputs
  with one shift each (interleaved pairs measured 7x slower to expand).

The numpy dequantizers compute exactly what the kernels compute (float32, q * scale + offset),
so a model evaluated with dequantized weights shows the quantized model's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

NIBBLE_BLOCK = 32  # columns per nibble block (see the module docstring)
COLUMN_TILE = 64   # int4 columns stored together over all of K (see the module docstring)
SCHEMES = ("int8", "int4", "fp16")


@dataclass
class PackedWeight:
    """A quantized weight: its arrays by role, and what is needed to expand it."""

    scheme: str              # "int8" or "int4"
    k: int                   # reduction (input) size
    n: int                   # output size
    group: int               # int4 group size along K (0 for int8)
    symmetric: bool          # int4 without offsets (int8 is always symmetric)
    arrays: dict             # role ("q", "scale", "offset") -> numpy array; empty in a layout

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def roles(self) -> list[str]:
        if self.scheme == "fp16":
            return ["q"]
        return ["q", "scale"] if self.scheme == "int8" or self.symmetric else \
            ["q", "scale", "offset"]

    def layout_attr(self) -> str:
        """The layout as text, kept on the expansion kernels: `int4/32/asymmetric/K/N`."""
        return f"{self.scheme}/{self.group}/{'symmetric' if self.symmetric else 'asymmetric'}" \
            f"/{self.k}/{self.n}"

    @staticmethod
    def from_layout_attr(text: str) -> "PackedWeight":
        scheme, group, kind, k, n = text.split("/")
        return PackedWeight(scheme, int(k), int(n), int(group), kind == "symmetric", {})

    def shapes(self) -> dict:
        """role -> (shape, dtype) of the packed arrays."""
        k, n = self.k, self.n
        if self.scheme == "fp16":
            return {"q": ((k, n), "float16")}
        if self.scheme == "int8":
            return {"q": ((k, n), "int8"), "scale": ((n,), "float32")}
        groups = {"scale": ((k // self.group, n), "float32")}
        if not self.symmetric:
            groups["offset"] = ((k // self.group, n), "float32")
        return {"q": ((n // COLUMN_TILE, k, COLUMN_TILE // 2), "uint8"), **groups}


def can_pack(scheme: str, n: int, k: int, group: int) -> str | None:
    """Why a [N, K] weight cannot take the format, or None when it can."""
    if scheme == "int4":
        if n % COLUMN_TILE:
            return f"{n} outputs are not a multiple of {COLUMN_TILE}"
        if k % group:
            return f"{k} inputs are not a multiple of the group size {group}"
    return None


def quantize(weight_nk: np.ndarray, scheme: str, group: int = 32,
             symmetric: bool = False) -> PackedWeight:
    """Quantize a float weight W [N, K] (torch's Linear layout) into a packed format."""
    w = np.asarray(weight_nk, dtype=np.float32)
    n, k = w.shape
    if scheme == "fp16":
        return PackedWeight("fp16", k, n, 0, True, {"q": np.ascontiguousarray(
            w.T.astype(np.float16))})
    if scheme == "int8":
        scale = np.abs(w).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        return PackedWeight("int8", k, n, 0, True, {"q": np.ascontiguousarray(q.T),
                                                    "scale": scale})
    if scheme != "int4":
        raise ValueError(f"unknown scheme {scheme!r}")
    groups = w.reshape(n, k // group, group)
    if symmetric:
        scale = np.abs(groups).max(axis=2) / 7.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(groups / scale[..., None]), -8, 7) + 8
        offset = None
    else:
        low, high = groups.min(axis=2), groups.max(axis=2)
        scale = ((high - low) / 15.0).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        offset = low.astype(np.float32)
        q = np.clip(np.rint((groups - offset[..., None]) / scale[..., None]), 0, 15)
    q = q.reshape(n, k).astype(np.uint8).T  # [K, N]
    blocks = q.reshape(k, n // NIBBLE_BLOCK, 2, NIBBLE_BLOCK // 2)
    packed = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(k, n // COLUMN_TILE,
                                                                       COLUMN_TILE // 2)
    packed = packed.transpose(1, 0, 2)  # [N / tile, K, tile / 2]
    arrays = {"q": np.ascontiguousarray(packed), "scale": np.ascontiguousarray(scale.T)}
    if offset is not None:
        arrays["offset"] = np.ascontiguousarray(offset.T)
    return PackedWeight("int4", k, n, group, symmetric, arrays)


def dequantize(packed: PackedWeight) -> np.ndarray:
    """The float32 weight [N, K] the kernels compute from `packed`."""
    a = packed.arrays
    if packed.scheme == "fp16":
        return a["q"].astype(np.float32).T.copy()
    if packed.scheme == "int8":
        return (a["q"].astype(np.float32) * a["scale"][None, :]).T.copy()
    k, n, g = packed.k, packed.n, packed.group
    blocks = a["q"].transpose(1, 0, 2).reshape(k, n // NIBBLE_BLOCK, 1, NIBBLE_BLOCK // 2)
    q = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(k, n).astype(np.float32)
    scale = np.repeat(a["scale"], g, axis=0)
    if "offset" in a:
        w = q * scale + np.repeat(a["offset"], g, axis=0)
    else:
        w = (q - np.float32(8)) * scale
    return w.astype(np.float32).T.copy()


# --- TIR kernels ---------------------------------------------------------------------------

def _i64(value: int):
    return tirx.IntImm("int64", value)


def _operands(packed: PackedWeight) -> list:
    """TE placeholders for the packed arrays, in `roles()` order."""
    shapes = packed.shapes()
    return [te.placeholder([_i64(d) for d in shapes[role][0]], shapes[role][1], name=role)
            for role in packed.roles()]


def _expand(packed: PackedWeight, operands: list, row, col):
    """The float32 weight at [row (K), col (N)] from the packed operands."""
    parts = dict(zip(packed.roles(), operands))
    q = parts["q"]
    if packed.scheme == "fp16":
        return q[row, col].astype("float32")
    scale = parts["scale"]
    if packed.scheme == "int8":
        return q[row, col].astype("float32") * scale[col]
    byte, shift = _nibble_address(q, row, col)
    nibble = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8"))
    value = nibble.astype("float32")
    group = row // packed.group
    if "offset" in parts:
        return value * scale[group, col] + parts["offset"][group, col]
    return (value - tirx.const(8, "float32")) * scale[group, col]


def _nibble_address(q, row, col):
    """The byte holding the int4 weight [row (K), col (N)] and the shift to its nibble."""
    half = NIBBLE_BLOCK // 2
    byte = q[col // COLUMN_TILE, row, col % COLUMN_TILE // NIBBLE_BLOCK * half + col % half]
    return byte, (col % NIBBLE_BLOCK // half * 4).astype("uint8")


def dequantize_func(packed: PackedWeight) -> tirx.PrimFunc:
    """A PrimFunc expanding the packed arrays into the float32 weight [K, N]."""
    operands = _operands(packed)
    weight = te.compute((_i64(packed.k), _i64(packed.n)),
                        lambda i, j: _expand(packed, operands, i, j), name="dequantize")
    return _private(te.create_prim_func([*operands, weight])).with_attr(
        "graft.dequantize", packed.layout_attr())


def gather_func(packed: PackedWeight, ids_dtype: str) -> tirx.PrimFunc:
    """A PrimFunc taking rows of the original [N, K] table (an embedding tied to a quantized
    output layer) for a vector of ids: out[r, :] = W[ids[r], :]. Ids past the table are clipped,
    as `take` is legalized (see codegen/rewrites/clipped_take.py)."""
    operands = _operands(packed)
    count = tirx.Var("count", "int64")
    ids = te.placeholder((count,), ids_dtype, name="ids")
    last = _i64(packed.n - 1)

    def row_of(r):
        return tirx.max(tirx.min(ids[r].astype("int64"), last), _i64(0))

    out = te.compute((count, _i64(packed.k)),
                     lambda r, h: _expand(packed, operands, h, row_of(r)), name="gather")
    return _private(te.create_prim_func([*operands, ids, out]))


def _private(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """No global symbol (the module names the kernel), and no aliasing between buffers."""
    return func.without_attr("global_symbol").with_attr("tirx.noalias", True)


def gemv_func(packed: PackedWeight, x_shape: list[int]) -> tirx.PrimFunc:
    """int4 only: y = x @ W for an x of one row, with the scales applied once per group:

        part[g, n] = sum over the group's k of x[k] * q4[k, n]
        y[n]       = sum over g of part[g, n] * scale[g, n] + xsum[g] * offset[g, n]
                     (symmetric: (part[g, n] - 8 * xsum[g]) * scale[g, n])

    so expanding a weight costs a shift, a mask and a conversion, and one multiply-add. The
    blocks are named graft_gemv_* for the QuantizedGEMV schedule rule (codegen/cpu/)."""
    assert packed.scheme == "int4"
    operands = _operands(packed)
    parts = dict(zip(packed.roles(), operands))
    k, n, g = packed.k, packed.n, packed.group
    lead = [_i64(d) for d in x_shape[:-1]]
    x = te.placeholder([*lead, _i64(k)], "float32", name="x")
    zeros = [_i64(0)] * len(lead)

    def nibble(row, col):
        byte, shift = _nibble_address(parts["q"], row, col)
        return tirx.bitwise_and(tirx.shift_right(byte, shift),
                                tirx.const(15, "uint8")).astype("float32")

    kk = te.reduce_axis((_i64(0), _i64(g)), name="kk")
    xsum = te.compute((_i64(k // g),), lambda grp: te.sum(x[(*zeros, grp * g + kk)], axis=kk),
                      name="graft_gemv_xsum")
    kk = te.reduce_axis((_i64(0), _i64(g)), name="kk")
    part = te.compute((_i64(k // g), _i64(n)), lambda grp, col: te.sum(
        x[(*zeros, grp * g + kk)] * nibble(grp * g + kk, col), axis=kk), name="graft_gemv_part")
    gr = te.reduce_axis((_i64(0), _i64(k // g)), name="gr")
    if "offset" in parts:
        def term(col):
            return part[gr, col] * parts["scale"][gr, col] + xsum[gr] * parts["offset"][gr, col]
    else:
        def term(col):
            return (part[gr, col] - xsum[gr] * tirx.const(8, "float32")) * parts["scale"][gr, col]
    y = te.compute([*lead, _i64(n)], lambda *idx: te.sum(term(idx[-1]), axis=gr),
                   name="graft_gemv_sum")
    func = te.create_prim_func([x, *operands, y])
    return _private(func).with_attr("op_pattern", 4)  # kOutEWiseFusable: epilogues fuse in
