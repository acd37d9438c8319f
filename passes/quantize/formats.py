"""Packed weight formats: the numpy quantizers, their exact numpy inverses, and the TIR kernels
that expand them (see DESIGN.md, "Passes").

A linear layer's weight W [N out, K in] is stored in layouts the CPU kernels stream, where a
row of K is a vector of outputs:

- fp16: `q` float16 [K, N]; w = float32(q) (storage only: products stay float32).
- int8, per output channel, symmetric: `q` int8 [K, N], `scale` float32 [N];
  w = q * scale.
- int4, group-wise along K (the reduction axis), eight values per 32-bit word: `q` uint32
  [N/64, K/8, 64] (tiles of 64 output columns, each contiguous over all of K, so a task that
  owns a tile streams one run of memory; row by row, [K, N/2] costs a new page per row),
  `scale` float16 [N/64, K/G, 64] and, unless symmetric, `offset` float16 [N/64, K/G, 64]
  (tile-major like `q`, so a task reads its groups' scales from one run of memory; half
  precision, as GGUF's Q4_1 stores them, so they add 1/8 byte per weight instead of 1/4);
  w = q4 * scale + offset (asymmetric, q4 in 0..15; an offset per group is a zero point kept in
  float) or w = (q4 - 8) * scale (symmetric). Each group's scale and offset minimise its
  weighted squared rounding error (a search over ranges, each refitted by least squares, as
  llama.cpp's k-quants do; see `_int4_groups`), not just its min and max.
  Nibble order: word [t, o, c] holds column 64 t + c at rows 8 o .. 8 o + 7, row 8 o + j in
  bits 4 j .. 4 j + 3. A vector of 16 words is then 16 outputs at eight rows, and row j's values
  come out with one mask and one unsigned conversion (q4 * 2^(4 j), exact), the 2^(4 j) undone
  on x instead (see `gemv_func`): three instructions per 16 weights, no widening shuffles.
  (Bytes of two nibbles, widened to 32-bit lanes, took four, and interleaved pairs measured 7x
  slower still.)

The numpy dequantizers compute exactly what the kernels compute (float32, q * scale + offset),
so a model evaluated with dequantized weights shows the quantized model's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

COLUMN_TILE = 64   # int4 columns stored together over all of K (see the module docstring)
WORD_ROWS = 8      # int4 rows (of K) per 32-bit word
SCHEMES = ("int8", "int4", "fp16")
FLOAT16_LIMIT = 60000.0  # int4 weights beyond it would overflow their float16 scale/offset


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
        groups = {"scale": ((n // COLUMN_TILE, k // self.group, COLUMN_TILE), "float16")}
        if not self.symmetric:
            groups["offset"] = groups["scale"]
        return {"q": ((n // COLUMN_TILE, k // WORD_ROWS, COLUMN_TILE), "uint32"), **groups}


def can_pack(scheme: str, n: int, k: int, group: int, weight: np.ndarray | None = None) \
        -> str | None:
    """Why a [N, K] weight cannot take the format, or None when it can."""
    if scheme == "int4":
        if weight is not None and not np.all(np.abs(weight) < FLOAT16_LIMIT):
            return f"values up to {np.abs(weight).max():.4g}: int4 scales are float16"
        if n % COLUMN_TILE:
            return f"{n} outputs are not a multiple of {COLUMN_TILE}"
        if k % group:
            return f"{k} inputs are not a multiple of the group size {group}"
    return None


def quantize(weight_nk: np.ndarray, scheme: str, group: int = 32, symmetric: bool = False,
             importance: np.ndarray | None = None) -> PackedWeight:
    """Quantize a float weight W [N, K] (torch's Linear layout) into a packed format.
    `importance` [K]: int4 only, how much each input channel matters (the mean square of the
    layer's input on calibration data); errors on busy channels are weighted up."""
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
    why = can_pack(scheme, n, k, group, w)
    if why is not None:
        raise ValueError(f"cannot pack a [{n}, {k}] weight as int4: {why}")
    channels = np.ones(k, np.float32) if importance is None else \
        np.asarray(importance, np.float32).reshape(k)
    # relative to the mean; a channel quiet in calibration keeps a little weight of its own
    channels = np.maximum(channels / max(float(channels.mean()), 1e-30), IMPORTANCE_FLOOR)
    channels = channels.reshape(1, k // group, group)
    q, scale, offset = np.empty((n, k), np.uint8), np.empty((n, k // group), np.float16), \
        np.empty((n, k // group), np.float16)
    for rows in range(0, n, ROWS_PER_CHUNK):
        q[rows:rows + ROWS_PER_CHUNK], scale[rows:rows + ROWS_PER_CHUNK], \
            offset[rows:rows + ROWS_PER_CHUNK] = _int4_groups(
                w[rows:rows + ROWS_PER_CHUNK].reshape(-1, k // group, group), symmetric, channels)
    rows = q.T.reshape(k // WORD_ROWS, WORD_ROWS, n).astype(np.uint32)  # [K/8, 8, N]
    words = np.bitwise_or.reduce(rows << (4 * np.arange(WORD_ROWS, dtype=np.uint32))[:, None],
                                 axis=1)  # [K/8, N]
    packed = words.reshape(k // WORD_ROWS, n // COLUMN_TILE, COLUMN_TILE).transpose(1, 0, 2)
    arrays = {"q": np.ascontiguousarray(packed), "scale": _tile_major(scale)}
    if not symmetric:
        arrays["offset"] = _tile_major(offset)
    return PackedWeight("int4", k, n, group, symmetric, arrays)


ROWS_PER_CHUNK = 128     # rows searched at once (keeps the search in cache)
IMPORTANCE_FLOOR = 0.01  # least weight of an input channel, relative to the mean
RANGE_TRIES = np.linspace(-1, 1, 9, dtype=np.float32)  # a group's range spans 15 + t steps


def _int4_groups(groups: np.ndarray, symmetric: bool, channel_importance: np.ndarray):
    """Per group of `groups` [R, K/G, G]: the 4-bit values (0..15), and the float16 scale and
    offset (zeros when symmetric) that minimise the weighted squared rounding error.

    An element's weight is its input channel's importance (mean square activation, [K/G, G])
    times (the group's RMS + |w|), llama.cpp's weighting: larger weights and busier inputs
    are kept closer, since plain least squares clips the outliers a language model needs. Each
    try spans the group's range with 15 + t steps, rounds, and refits the scale and offset
    to the rounded values by weighted least squares; the best fit is stored in float16, and
    the values rounded once more to their nearest level under the stored pair."""
    weight = channel_importance * (np.sqrt(np.square(groups).mean(axis=2, keepdims=True)) +
                                   np.abs(groups))
    sw = weight.sum(axis=2, keepdims=True)
    swx = (weight * groups).sum(axis=2, keepdims=True)

    def fit_and_keep(best, levels, fallback_scale, fallback_offset):
        wl = weight * levels
        sl, sll, slx = (wl.sum(axis=2, keepdims=True), (wl * levels).sum(axis=2, keepdims=True),
                        (wl * groups).sum(axis=2, keepdims=True))
        if symmetric:  # w = level * scale
            fitted = sll > 0
            scale = np.where(fitted, slx / np.where(fitted, sll, 1), fallback_scale)
            offset = np.zeros_like(scale)
        else:          # w = level * scale + offset
            det = sw * sll - sl * sl
            fitted = det > 0
            scale = np.where(fitted, (sw * slx - sl * swx) / np.where(fitted, det, 1),
                             fallback_scale)
            offset = np.where(fitted, (swx - scale * sl) / np.where(sw > 0, sw, 1),
                              fallback_offset)
        error = (weight * np.square(levels * scale + offset - groups)).sum(axis=2, keepdims=True)
        if best is None:
            return error, scale, offset
        better = error < best[0]
        return tuple(np.where(better, new, old) for new, old in zip((error, scale, offset), best))

    best = None
    if symmetric:  # level = q4 - 8, in -8..7
        peak = np.abs(groups).max(axis=2, keepdims=True)
        peak = np.where(peak > 0, peak, 1.0)
        for t in RANGE_TRIES:
            levels = np.clip(np.rint(groups * ((7 + t / 2) / peak)), -8, 7)
            best = fit_and_keep(best, levels, peak / 7, 0)
        scale = _stored(best[1])
        q = np.clip(np.rint(groups / scale), -8, 7) + 8
        offset = np.zeros_like(scale)
    else:
        low = groups.min(axis=2, keepdims=True)
        span = groups.max(axis=2, keepdims=True) - low
        span = np.where(span > 0, span, 1.0)
        for t in RANGE_TRIES:
            levels = np.clip(np.rint((groups - low) * ((15 + t) / span)), 0, 15)
            best = fit_and_keep(best, levels, span / 15, low)
        scale, offset = _stored(best[1]), best[2].astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((groups - offset) / scale), 0, 15)
    return q.astype(np.uint8).reshape(groups.shape[0], -1), \
        scale[..., 0].astype(np.float16), offset[..., 0].astype(np.float16)


def _stored(scale: np.ndarray) -> np.ndarray:
    """A positive scale as float16 keeps it, back in float32 (a group whose values are all
    equal, or a scale below float16's range, takes 1: its values round to the offset)."""
    scale = np.abs(scale).astype(np.float16).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0))


def _tile_major(per_group: np.ndarray) -> np.ndarray:
    """[N, K/G] -> [N/64, K/G, 64], the layout of `q` (see the module docstring)."""
    n, groups = per_group.shape
    return np.ascontiguousarray(per_group.reshape(n // COLUMN_TILE, COLUMN_TILE, groups)
                                .transpose(0, 2, 1))


def _row_major(tiled: np.ndarray) -> np.ndarray:
    """[N/64, K/G, 64] -> [K/G, N] float32 (the inverse of `_tile_major`, transposed)."""
    tiles, groups, width = tiled.shape
    return tiled.transpose(1, 0, 2).reshape(groups, tiles * width).astype(np.float32)


def dequantize(packed: PackedWeight) -> np.ndarray:
    """The float32 weight [N, K] the kernels compute from `packed`."""
    a = packed.arrays
    if packed.scheme == "fp16":
        return a["q"].astype(np.float32).T.copy()
    if packed.scheme == "int8":
        return (a["q"].astype(np.float32) * a["scale"][None, :]).T.copy()
    k, n, g = packed.k, packed.n, packed.group
    words = a["q"].transpose(1, 0, 2).reshape(k // WORD_ROWS, 1, n)  # [K/8, 1, N]
    shifts = (4 * np.arange(WORD_ROWS, dtype=np.uint32))[:, None]
    q = ((words >> shifts) & 15).reshape(k, n).astype(np.float32)
    scale = np.repeat(_row_major(a["scale"]), g, axis=0)
    if "offset" in a:
        w = q * scale + np.repeat(_row_major(a["offset"]), g, axis=0)
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
    word, shift = _nibble_address(q, row, col)
    value = tirx.bitwise_and(tirx.shift_right(word, shift),
                             tirx.const(15, "uint32")).astype("float32")
    group = row // packed.group
    if "offset" in parts:
        return value * _per_group(scale, group, col) + _per_group(parts["offset"], group, col)
    return (value - tirx.const(8, "float32")) * _per_group(scale, group, col)


def _per_group(tiled, group, col):
    """A group's scale or offset for output `col`, as float32."""
    return tiled[col // COLUMN_TILE, group, col % COLUMN_TILE].astype("float32")


def _nibble_address(q, row, col):
    """The word holding the int4 weight [row (K), col (N)] and the shift to its nibble."""
    word = q[col // COLUMN_TILE, row // WORD_ROWS, col % COLUMN_TILE]
    return word, (row % WORD_ROWS * 4).astype("uint32")


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

    A weight is not shifted down to its nibble: row 8 o + j is read as the unsigned word masked
    to bits 4 j .. 4 j + 3, converted to float (q4 * 2^(4 j), exact), and multiplied by x[k]
    scaled by 2^(-4 j) once per call; the product is x[k] * q4 exactly, so a weight costs a
    mask, a conversion and one multiply-add. The blocks are named graft_gemv_* for the
    QuantizedGEMV schedule rule (codegen/cpu/)."""
    assert packed.scheme == "int4"
    operands = _operands(packed)
    parts = dict(zip(packed.roles(), operands))
    k, n, g = packed.k, packed.n, packed.group
    lead = [_i64(d) for d in x_shape[:-1]]
    x = te.placeholder([*lead, _i64(k)], "float32", name="x")
    zeros = [_i64(0)] * len(lead)

    def nibble_in_place(row, col):  # q4 * 2^(4 j)
        word, shift = _nibble_address(parts["q"], row, col)
        return tirx.bitwise_and(word, tirx.shift_left(tirx.const(15, "uint32"), shift)) \
            .astype("float32")

    def power_of_two(exponent):  # 2^exponent as float32 bits (exact; normal range only)
        bits = tirx.shift_left((exponent + 127).astype("uint32"), tirx.const(23, "uint32"))
        return tirx.reinterpret("float32", bits)

    x_scaled = te.compute((_i64(k),), lambda row: x[(*zeros, row)] * power_of_two(
        -(row % WORD_ROWS * 4).astype("int32")), name="graft_gemv_xscaled")
    kk = te.reduce_axis((_i64(0), _i64(g)), name="kk")
    xsum = te.compute((_i64(k // g),), lambda grp: te.sum(x[(*zeros, grp * g + kk)], axis=kk),
                      name="graft_gemv_xsum")
    kk = te.reduce_axis((_i64(0), _i64(g)), name="kk")
    part = te.compute((_i64(k // g), _i64(n)), lambda grp, col: te.sum(
        x_scaled[grp * g + kk] * nibble_in_place(grp * g + kk, col), axis=kk),
        name="graft_gemv_part")
    gr = te.reduce_axis((_i64(0), _i64(k // g)), name="gr")
    if "offset" in parts:
        def term(col):
            return part[gr, col] * _per_group(parts["scale"], gr, col) + \
                xsum[gr] * _per_group(parts["offset"], gr, col)
    else:
        def term(col):
            return (part[gr, col] - xsum[gr] * tirx.const(8, "float32")) * \
                _per_group(parts["scale"], gr, col)
    y = te.compute([*lead, _i64(n)], lambda *idx: te.sum(term(idx[-1]), axis=gr),
                   name="graft_gemv_sum")
    func = te.create_prim_func([x, *operands, y])
    return _private(func).with_attr("op_pattern", 4)  # kOutEWiseFusable: epilogues fuse in
