"""ONNX image ops TVM's importer lacks or takes only with constant shapes: AffineGrid and
Col2Im (sizes given at run time), DeformConv, and MaxPool with its indices output."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from graft.frontend.onnx_runtime_shapes import dim_tensor, sizes_of


class AffineGrid(tvm_onnx.OnnxOpConverter):
    """theta [N, 2, 3] (or [N, 3, 4]) applied to the normalized grid of `size` [N, C, H, W]
    (or [N, C, D, H, W]), which may be given at run time: [N, H, W, 2] (or [N, D, H, W, 3])."""

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        theta, size = inputs
        theta = bb.normalize(theta)
        align_corners = bool(attr.get("align_corners", 0))
        spatial = sizes_of(bb, size, params, "affine_grid")[2:]
        dtype = str(theta.ty.dtype)
        coordinates = []  # per spatial dim, positions in [-1, 1]
        for length in spatial:
            steps = relax.op.arange(0, length, 1, "float32")
            count = relax.op.astype(dim_tensor(length), "float32")
            if align_corners:
                step = relax.op.divide(relax.const(2.0, "float32"),
                                       relax.op.subtract(count, relax.const(1.0, "float32")))
                position = relax.op.subtract(relax.op.multiply(steps, step),
                                             relax.const(1.0, "float32"))
            else:
                position = relax.op.subtract(
                    relax.op.divide(relax.op.add(relax.op.multiply(steps, relax.const(
                        2.0, "float32")), relax.const(1.0, "float32")), count),
                    relax.const(1.0, "float32"))
            coordinates.append(position)
        rank = len(spatial)
        grid_shape = relax.ShapeExpr(list(spatial) + [1])
        planes = []
        for dim in reversed(range(rank)):  # x (the last dim) first, then y, then z
            shape = [1] * rank + [1]
            shape[dim] = spatial[dim]
            planes.append(relax.op.broadcast_to(relax.op.reshape(coordinates[dim], shape),
                                                grid_shape))
        planes.append(relax.op.ones(grid_shape, "float32"))
        points = 1
        for length in spatial:
            points = points * length
        grid = relax.op.reshape(relax.op.concat(planes, axis=rank), (points, rank + 1))
        grid = relax.op.astype(grid, dtype)
        moved = relax.op.matmul(grid, relax.op.permute_dims(theta, [0, 2, 1]))  # [N, P, rank]
        batch = theta.ty.shape.values[0]
        return relax.op.reshape(moved, [batch] + list(spatial) + [rank])


class Col2Im(tvm_onnx.OnnxOpConverter):
    """Blocks [N, C * prod(block), L] summed back into images [N, C, *image_shape], the image and
    block shapes constant or given at run time: every input element's target position is
    computed (its channel, block offset and block index decomposed row-major, then stride,
    padding and dilation applied) and the elements are scatter-added there; those that land in
    the padding go to one extra slot, dropped at the end."""

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        data, image_shape, block_shape = inputs
        data = bb.normalize(data)
        batch, merged, blocks = data.ty.shape.values
        image = sizes_of(bb, image_shape, params, "col2im_image")
        count = len(image)
        strides = list(attr.get("strides", [1] * count))
        dilations = list(attr.get("dilations", [1] * count))
        pads = list(attr.get("pads", [0] * (2 * count)))
        int64 = "int64"

        def ints(value):
            return relax.const(value, int64)

        image_shape = bb.normalize(relax.op.astype(image_shape, int64))
        block_shape = bb.normalize(relax.op.astype(block_shape, int64))
        image_t = [relax.op.take(image_shape, ints(d), axis=0) for d in range(count)]
        block_t = [relax.op.take(block_shape, ints(d), axis=0) for d in range(count)]
        per_channel = block_t[0]
        for b in block_t[1:]:
            per_channel = relax.op.multiply(per_channel, b)
        (channels,) = sizes_of(bb, relax.op.floor_divide(dim_tensor(merged), per_channel),
                               params, "col2im_channels")
        grid = [batch, merged, blocks]
        n, ci, cell = (relax.op.reshape(relax.op.arange(0, grid[a], 1, int64),
                                        [grid[a] if b == a else 1 for b in range(3)])
                       for a in range(3))
        channel = relax.op.floor_divide(ci, per_channel)
        offset, along = relax.op.floor_mod(ci, per_channel), [None] * count
        counts = []
        for d in range(count):
            extent = relax.op.add(relax.op.multiply(relax.op.subtract(block_t[d], ints(1)),
                                                    ints(dilations[d])), ints(1))
            room = relax.op.add(image_t[d], ints(pads[d] + pads[count + d]))
            counts.append(relax.op.add(relax.op.floor_divide(
                relax.op.subtract(room, extent), ints(strides[d])), ints(1)))
        block_index = [None] * count
        for d in reversed(range(count)):  # row-major: the last dim varies fastest
            along[d] = relax.op.floor_mod(offset, block_t[d])
            offset = relax.op.floor_divide(offset, block_t[d])
            block_index[d] = relax.op.floor_mod(cell, counts[d])
            cell = relax.op.floor_divide(cell, counts[d])
        target, inside = relax.op.add(relax.op.multiply(n, dim_tensor(channels)), channel), None
        for d in range(count):
            position = relax.op.add(relax.op.subtract(
                relax.op.multiply(block_index[d], ints(strides[d])), ints(pads[d])),
                relax.op.multiply(along[d], ints(dilations[d])))
            fits = relax.op.logical_and(relax.op.greater_equal(position, ints(0)),
                                        relax.op.less(position, image_t[d]))
            inside = fits if inside is None else relax.op.logical_and(inside, fits)
            target = relax.op.add(relax.op.multiply(target, image_t[d]), position)
        total = batch * channels
        for length in image:
            total = total * length
        target = relax.op.where(inside, target, dim_tensor(total))
        target = relax.op.reshape(bb.normalize(relax.op.broadcast_to(target, data.ty.shape)),
                                  (batch * merged * blocks,))
        summed = relax.op.scatter_elements(
            relax.op.zeros(relax.ShapeExpr([total + 1]), str(data.ty.dtype)),
            bb.normalize(target), relax.op.reshape(data, (batch * merged * blocks,)),
            axis=0, reduction="add")
        kept = bb.normalize(relax.op.strided_slice(summed, [0], [0], [total]))
        return relax.op.reshape(kept, [batch, channels, *image])


class DeformConv(tvm_onnx.OnnxOpConverter):
    """2-D deformable convolution: each kernel tap samples the input bilinearly (zero outside)
    at its position moved by the offset input (per offset group), weighted by the optional
    mask; the samples are then one grouped matmul with the weights."""

    @classmethod
    def _impl_v19(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (5 - len(inputs))
        x, weight, offset, bias, mask = (bb.normalize(v) if v is not None else None
                                         for v in inputs)
        if x.ty.ndim != 4:
            raise NotImplementedError("DeformConv other than 2-D")
        batch, channels, height, width = (int(d) for d in x.ty.shape.values)
        out_channels, _, kh, kw = (int(d) for d in weight.ty.shape.values)
        out_h, out_w = (int(d) for d in offset.ty.shape.values[2:])
        group, offset_group = attr.get("group", 1), attr.get("offset_group", 1)
        strides = list(attr.get("strides", [1, 1]))
        dilations = list(attr.get("dilations", [1, 1]))
        pads = list(attr.get("pads", [0, 0, 0, 0]))
        dtype = str(x.ty.dtype)
        taps, points = kh * kw, out_h * out_w
        rows = (np.arange(out_h)[None, :, None] * strides[0] - pads[0]
                + (np.arange(kh) * dilations[0]).repeat(kw)[:, None, None])
        cols = (np.arange(out_w)[None, None, :] * strides[1] - pads[1]
                + np.tile(np.arange(kw) * dilations[1], kh)[:, None, None])
        base_y = np.broadcast_to(rows, (taps, out_h, out_w)).reshape(taps, points)
        base_x = np.broadcast_to(cols, (taps, out_h, out_w)).reshape(taps, points)
        moved = relax.op.reshape(offset, (batch, offset_group, taps, 2, points))
        y = bb.normalize(relax.op.add(relax.const(base_y.astype(dtype)),
                                      relax.op.squeeze(relax.op.strided_slice(
                                          moved, [3], [0], [1]), [3])))  # [N, G, T, P]
        x_pos = bb.normalize(relax.op.add(relax.op.squeeze(relax.op.strided_slice(
            moved, [3], [1], [2]), [3]), relax.const(base_x.astype(dtype))))
        scale = (relax.op.reshape(mask, (batch, offset_group, taps, points)) if mask is not None
                 else None)
        top, left = bb.normalize(relax.op.floor(y)), bb.normalize(relax.op.floor(x_pos))
        down, right = relax.op.subtract(y, top), relax.op.subtract(x_pos, left)
        one = relax.const(1.0, dtype)
        per_group = channels // offset_group
        flat = relax.op.reshape(x, (batch, offset_group, per_group, height * width))
        sampled = None
        for dy, wy in ((0, relax.op.subtract(one, down)), (1, down)):
            for dx, wx in ((0, relax.op.subtract(one, right)), (1, right)):
                row = relax.op.add(top, relax.const(float(dy), dtype))
                col = relax.op.add(left, relax.const(float(dx), dtype))
                inside = relax.op.logical_and(
                    relax.op.logical_and(relax.op.greater_equal(row, relax.const(0.0, dtype)),
                                         relax.op.less(row, relax.const(float(height), dtype))),
                    relax.op.logical_and(relax.op.greater_equal(col, relax.const(0.0, dtype)),
                                         relax.op.less(col, relax.const(float(width), dtype))))
                share = relax.op.multiply(relax.op.multiply(wy, wx),
                                          relax.op.astype(inside, dtype))
                if scale is not None:
                    share = relax.op.multiply(share, scale)
                row = relax.op.clip(relax.op.astype(row, "int64"), 0, height - 1)
                col = relax.op.clip(relax.op.astype(col, "int64"), 0, width - 1)
                index = relax.op.add(relax.op.multiply(row, relax.const(width, "int64")), col)
                index = relax.op.broadcast_to(
                    relax.op.reshape(index, (batch, offset_group, 1, taps * points)),
                    (batch, offset_group, per_group, taps * points))
                values = relax.op.gather_elements(flat, index, axis=3)
                term = relax.op.multiply(values, relax.op.reshape(
                    share, (batch, offset_group, 1, taps * points)))
                sampled = term if sampled is None else relax.op.add(sampled, term)
        reduce = channels // group * taps
        columns = relax.op.reshape(sampled, (batch, group, reduce, points))
        kernel = relax.op.reshape(weight, (1, group, out_channels // group, reduce))
        result = relax.op.reshape(relax.op.matmul(kernel, columns),
                                  (batch, out_channels, out_h, out_w))
        if bias is not None:
            result = relax.op.add(result, relax.op.reshape(bias, (1, out_channels, 1, 1)))
        return result


class MaxPoolWithIndices(tvm_onnx.OnnxOpConverter):
    """2-D MaxPool with its second output, the flat index of each maximum in the input (row
    major, or column major within a plane for storage_order=1); onnx_fixes gives a MaxPool
    that asks for it this name. Each kernel tap is a gather at constant positions; a later tap
    wins only when strictly larger, so the first maximum is kept, as in the reference."""

    @classmethod
    def _impl_v8(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])
        if x.ty.ndim != 4:
            raise NotImplementedError("MaxPool's indices output for inputs other than 4-D")
        auto_pad = attr.get("auto_pad", b"NOTSET")
        if attr.get("ceil_mode", 0) or auto_pad not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError("MaxPool's indices output with ceil_mode or auto_pad")
        batch, channels, height, width = x.ty.shape.values
        height, width = int(height), int(width)
        kernel = list(attr["kernel_shape"])
        strides = list(attr.get("strides", [1, 1]))
        dilations = list(attr.get("dilations", [1, 1]))
        pads = list(attr.get("pads", [0, 0, 0, 0]))
        column_major = bool(attr.get("storage_order", 0))
        extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        out_h = (height + pads[0] + pads[2] - extent[0]) // strides[0] + 1
        out_w = (width + pads[1] + pads[3] - extent[1]) // strides[1] + 1
        dtype = str(x.ty.dtype)
        lowest = relax.const(-np.inf if "float" in dtype else np.iinfo(dtype).min, dtype)
        best = index = None
        for a in range(kernel[0]):
            rows = np.arange(out_h) * strides[0] - pads[0] + a * dilations[0]
            for b in range(kernel[1]):
                cols = np.arange(out_w) * strides[1] - pads[1] + b * dilations[1]
                values = relax.op.take(
                    relax.op.take(x, relax.const(np.clip(rows, 0, height - 1), "int64"), axis=2),
                    relax.const(np.clip(cols, 0, width - 1), "int64"), axis=3)
                inside = ((rows >= 0) & (rows < height))[:, None] & \
                    ((cols >= 0) & (cols < width))[None, :]
                values = relax.op.where(relax.const(inside), values, lowest)
                flat = (rows[:, None] + cols[None, :] * height if column_major
                        else rows[:, None] * width + cols[None, :]).astype(np.int64)
                flat = relax.const(flat, "int64")
                if best is None:
                    best = bb.normalize(values)
                    index = bb.normalize(relax.op.broadcast_to(flat, best.ty.shape))
                    continue
                better = bb.normalize(relax.op.greater(values, best))
                best = bb.normalize(relax.op.where(better, values, best))
                index = bb.normalize(relax.op.where(better, flat, index))
        planes = relax.op.add(
            relax.op.multiply(relax.op.expand_dims(relax.op.arange(0, batch, 1, "int64"), 1),
                              dim_tensor(channels)),
            relax.op.expand_dims(relax.op.arange(0, channels, 1, "int64"), 0))  # [N, C]
        offset = relax.op.multiply(relax.op.reshape(planes, [batch, channels, 1, 1]),
                                   relax.const(height * width, "int64"))
        return relax.Tuple([best, bb.normalize(relax.op.add(index, offset))])


CONVERTERS = {"AffineGrid": AffineGrid, "Col2Im": Col2Im, "DeformConv": DeformConv,
              "MaxPoolWithIndices": MaxPoolWithIndices}
