"""CPU schedules without tuning: convolutions as register-tiled vector loops, the rest parallel.

Two steps around Relax's "zero" pipeline (`lower.build` calls both for LLVM targets):

`legalize(mod)` lowers `relax.nn.conv2d` (NCHW/OIHW, one group, no dilation) and
`relax.nn.conv2d_transpose` (NCHW/IOHW, kernel a multiple of the stride, output a multiple of
the stride) to our own TE computes instead of TOPI's, shaped for the schedules below:
- conv2d: a padded copy of the input kept per column phase, [N, C, Hp, s, Wp/s], so that the
  output columns of a strided convolution read contiguous input: every load is a vector load.
- conv2d_transpose: split by output phase, out[y = s*yh + py, x = s*xh + px] sums only the
  (k/s)^2 taps that hit real input, instead of TOPI's convolution over a zero-dilated input
  (4x the work for FlowNet's 4x4 stride-2 deconvolutions).
Anything else keeps TVM's legalization. Before that, `lower.prepare` calls
`winograd_convolutions(mod)`: fp32 3x3 stride-1 convolutions with at least 32 channels in and
out and 32+ output columns become Winograd F(2x2, 3x3) (`winograd_conv2d_te`: 16 products per
2x2 output tile instead of 36), their weights transformed once at compile time.

`schedule(mod, target)` is a dlight pass (`ApplyDefaultSchedule`) with three rules:
- `Conv`: the PrimFuncs holding one of our convolutions (after FuseOps: with its bias, LeakyReLU
  and other elementwise consumers). Per output row and block of `f` output channels, `v` vectors
  of `lanes` output columns accumulate in registers while the input channels and kernel taps
  stream by (input: a vector load per tap, weights: a broadcast), then the epilogue writes them.
  `f` and `v` fill the target's vector registers. Blocks of output rows run in parallel, each
  padding the input rows it reads first: one parallel region (one wake-up of the thread pool)
  per convolution. 24 blocks where the rows divide (even shares for 1-4, 6 and 8 threads).
- `Winograd`: the Winograd PrimFuncs, the same register tile for the 16 products per block of
  tile rows, the input and output transforms computed beside them.
- `Elementwise`: every other PrimFunc (concat, resize, pad, casts, reductions): producers
  inlined, outer loops fused and parallel, innermost loop vectorised where it divides; a
  reduction over contiguous data (the images' mean) sums in vector lanes (rfactor).
Hand-scheduled PrimFuncs (correlation, warp) carry `tirx.is_scheduled` and are left alone.

No tuning: TVM 0.27 has no CPU schedules for convolutions besides MetaSchedule's search
(`static_shape_tuning` pipeline); its dlight CPU rules cover GEMV and softmax-like reductions.
flownet2-s at 384x512 on one Zen 4 core: ~4.3 s unscheduled, ~52 ms with these before Winograd,
~48.5 ms with it (ONNX Runtime ~56.5 ms); the direct convolutions run at ~90-110 GFLOP/s, conv3_1
and conv4_1 by Winograd 1.6-1.9x faster than direct (`edgeflow bench` measures the whole).
"""

from __future__ import annotations

from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

PAD, CONV, DECONV_PAD, DECONV, DECONV_OUT = "ef_pad", "ef_conv", "ef_dpad", "ef_deconv", "ef_deconv_out"
WINO_PAD, WINO_V, WINO_M, WINO_Y, WINO_OUT = "ef_wpad", "ef_wv", "ef_wm", "ef_wy", "ef_wy_out"
WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # F(2x2, 3x3), Lavin & Gray 2016


# --------------------------------------------------------------------------------------------
# Relax -> TE


def conv2d_te(data, weight, strides, padding, out_dtype):
    """NCHW x OIHW -> NCHW, through an input padded and split by column phase."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in data.shape)
    f, _, kh, kw = (int(v) for v in weight.shape)
    sh, sw = strides
    pt, pl, pb, pr = padding
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    hp, wq = (oh - 1) * sh + kh, ow + (kw - 1) // sw

    def padded(b, ch, yp, px, xq):
        y, x = yp - pt, xq * sw + px - pl
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[b, ch, y, x], tirx.const(0, data.dtype)).astype(out_dtype)

    pad = te.compute((n, c, hp, sw, wq), padded, name=PAD)
    rc, ry, rx = te.reduce_axis((0, c), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    return te.compute(
        (n, f, oh, ow),
        lambda b, o, y, x: te.sum(pad[b, rc, y * sh + ry, rx % sw, x + rx // sw]
                                  * weight[o, rc, ry, rx].astype(out_dtype), axis=[rc, ry, rx]),
        name=CONV)


def conv2d_transpose_te(data, weight, strides, padding, out_hw, out_dtype):
    """NCHW x IOHW -> NCHW, one sub-convolution of (k/s)^2 taps per output phase.

    y = s*iy - pad + ky; with y + pad = s*q + r the taps are ky = s*t + r, iy = q - t."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in data.shape)
    _, f, kh, kw = (int(v) for v in weight.shape)
    sh, sw = strides
    pt, pl = padding[0], padding[1]
    oh, ow = out_hw
    th, tw = kh // sh, kw // sw
    lo_y, lo_x = th - 1, tw - 1
    hi_y = max(0, oh // sh - 1 + (sh - 1 + pt) // sh - (h - 1))
    hi_x = max(0, ow // sw - 1 + (sw - 1 + pl) // sw - (w - 1))

    def padded(b, ch, y, x):
        inside = tirx.all(y >= lo_y, y < h + lo_y, x >= lo_x, x < w + lo_x)
        return tirx.if_then_else(inside, data[b, ch, y - lo_y, x - lo_x],
                                 tirx.const(0, data.dtype)).astype(out_dtype)

    dpad = te.compute((n, c, h + lo_y + hi_y, w + lo_x + hi_x), padded, name=DECONV_PAD)
    rc, ty, tx = te.reduce_axis((0, c), "rc"), te.reduce_axis((0, th), "ty"), te.reduce_axis((0, tw), "tx")

    def phase(b, o, yh, py, px, xh):
        iy = yh + (py + pt) // sh - ty + lo_y
        ix = xh + (px + pl) // sw - tx + lo_x
        return te.sum(dpad[b, rc, iy, ix] * weight[rc, o, sh * ty + (py + pt) % sh,
                                                   sw * tx + (px + pl) % sw].astype(out_dtype),
                      axis=[rc, ty, tx])

    red = te.compute((n, f, oh // sh, sh, sw, ow // sw), phase, name=DECONV)
    return te.compute((n, f, oh, ow), lambda b, o, y, x: red[b, o, y // sh, y % sh, x % sw, x // sw],
                      name=DECONV_OUT)


def winograd_conv2d_te(data, weight, out_dtype):
    """3x3, stride 1, padding 1 convolution by Winograd F(2x2, 3x3): NCHW x [4, 4, C, F] weights
    already transformed (U = G w G^T, `winograd_convolutions`) -> NCHW. Per 2x2 output tile
    V = B^T d B of its 4x4 input patch (rows of B^T: two of the patch's rows/columns each), then
    16 products over the channels M = U V (the convolution's work, 16/36 of the direct form), then
    Y = A^T M A (rows of A^T: three of M's). The input is padded per column phase like `conv2d_te`
    (so tiles of adjacent columns read contiguous input), the output is written per row and
    column phase, like the split deconvolutions."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in data.shape)
    f = int(weight.shape[3])
    th, tw = h // 2, w // 2

    def padded(b, ch, yp, px, xq):
        y, x = yp - 1, 2 * xq + px - 1
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[b, ch, y, x], tirx.const(0, data.dtype)).astype(out_dtype)

    pad = te.compute((n, c, h + 2, 2, tw + 1), padded, name=WINO_PAD)

    def pick(values, i):  # values[i] for a loop variable i (constant once the loop is unrolled)
        out = values[-1]
        for k in range(len(values) - 2, -1, -1):
            out = tirx.Select(i == k, values[k], out)
        return out

    def row(i, k):  # B^T's row i is +d[first] + sign * d[second]
        return pick([0, 1, 2, 1], i) if k == 0 else pick([2, 2, 1, 3], i)

    def sign(i, k):
        return tirx.const(1, out_dtype) if k == 0 else pick([tirx.const(v, out_dtype) for v in (-1, 1, -1, -1)], i)

    v = te.compute((4, 4, n, c, th, tw), lambda xi, nu, b, ch, t, u: sum(
        sign(xi, k) * sign(nu, m) * pad[b, ch, 2 * t + row(xi, k), row(nu, m) % 2, u + row(nu, m) // 2]
        for k in range(2) for m in range(2)), name=WINO_V)
    rc = te.reduce_axis((0, c), "rc")
    mm = te.compute((4, 4, n, f, th, tw), lambda xi, nu, b, o, t, u: te.sum(
        weight[xi, nu, rc, o].astype(out_dtype) * v[xi, nu, b, rc, t, u], axis=rc), name=WINO_M)

    def phase(b, o, t, i, j, u):  # A^T's row i: +M[i] + s M[i+1] + s M[i+2], s = +1 for i = 0, -1 for i = 1
        s_i = tirx.Select(i == 0, tirx.const(1, out_dtype), tirx.const(-1, out_dtype))
        s_j = tirx.Select(j == 0, tirx.const(1, out_dtype), tirx.const(-1, out_dtype))
        return sum((s_i if p else 1) * (s_j if q else 1) * mm[i + p, j + q, b, o, t, u]
                   for p in range(3) for q in range(3))

    y = te.compute((n, f, th, 2, 2, tw), phase, name=WINO_Y)
    return te.compute((n, f, h, w), lambda b, o, yy, xx: y[b, o, yy // 2, yy % 2, xx % 2, xx // 2], name=WINO_OUT)


def winograd_eligible(data_shape, weight_shape, attrs) -> bool:
    """Whether a conv2d is one `winograd_convolutions` rewrites: 3x3, stride 1, padding 1, no
    dilation or groups, NCHW/OIHW, static, even H and W with W/2 a multiple of 16 (a full AVX-512
    vector of tiles; narrower layers keep the direct form), and at least 32 channels in and out
    (the 2-channel flow predictors keep it too)."""
    try:
        n, c, h, w = (int(d) for d in data_shape)
        f, c2, kh, kw = (int(d) for d in weight_shape)
    except (TypeError, ValueError):
        return False
    return (attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW" and attrs.out_layout == "NCHW"
            and int(attrs.groups) == 1 and all(int(d) == 1 for d in attrs.dilation)
            and [int(s) for s in attrs.strides] == [1, 1] and [int(p) for p in attrs.padding] == [1, 1, 1, 1]
            and (kh, kw) == (3, 3) and h % 2 == 0 and w % 32 == 0 and c >= 32 and f >= 32)


def winograd_convolutions(mod):
    """`mod` with its eligible fp32 conv2d (`winograd_eligible`) as Winograd F(2x2, 3x3): the
    weight transform U = G w G^T in Relax ops on the weight alone (so `lower.prepare` lifts it out
    and stores U in the package: [4, 4, C, F] under the weight's name), the rest one PrimFunc
    (`winograd_conv2d_te`, scheduled by `Winograd`)."""
    import numpy as np
    import tvm
    from tvm import relax

    from edgeflow.compile.cuda_convs import _rewrite_functions

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    g = relax.const(np.array(WINOGRAD_G, "float32"))
    gt = relax.const(np.array(WINOGRAD_G, "float32").T.copy())

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(conv_op):
                return call
            data, weight = call.args
            if (str(call.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32"
                    or not winograd_eligible(data.ty.shape, weight.ty.shape, call.attrs)):
                return call
            op = relax.op
            u = self.builder_.emit(op.permute_dims(op.matmul(op.matmul(g, weight), gt), [2, 3, 1, 0]))
            return self.builder_.call_te(winograd_conv2d_te, data, u, out_dtype="float32",
                                         primfunc_name_hint="conv2d_winograd")

    return _rewrite_functions(mod, Rewrite)


def winograd_weights_inverse(u):
    """The 3x3 weights [F, C, 3, 3] of Winograd weights u [4, 4, C, F] (G has full column rank:
    w = G+ u G+^T exactly, up to rounding). For rebuilding the torch model of a package."""
    import numpy as np

    pinv = np.linalg.pinv(np.array(WINOGRAD_G, np.float64))
    w = np.einsum("ik,klcf,jl->fcij", pinv, np.asarray(u, np.float64), pinv)
    return w.astype(np.float32)


def _default(op_name):
    import tvm

    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _static(*shapes) -> bool:
    from tvm import tirx

    return all(isinstance(d, (int, tirx.IntImm)) for s in shapes for d in s)


def _legalize_conv2d(bb, call):
    a = call.attrs
    data, weight = call.args
    dshape, wshape = data.ty.shape, weight.ty.shape
    if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW" or int(a.groups) != 1
            or any(int(d) != 1 for d in a.dilation) or not _static(dshape, wshape)):
        return _default("relax.nn.conv2d")(bb, call)
    return bb.call_te(conv2d_te, data, weight, strides=[int(s) for s in a.strides],
                      padding=[int(p) for p in a.padding], out_dtype=call.ty.dtype,
                      primfunc_name_hint="conv2d")


def _legalize_conv2d_transpose(bb, call):
    a = call.attrs
    data, weight = call.args
    dshape, wshape = data.ty.shape, weight.ty.shape
    oshape = call.ty.shape
    if oshape is None or not _static(dshape, wshape, oshape):
        return _default("relax.nn.conv2d_transpose")(bb, call)
    strides = [int(s) for s in a.strides]
    kernel = [int(wshape[2]), int(wshape[3])]
    out_hw = [int(oshape[2]), int(oshape[3])]
    if (a.data_layout != "NCHW" or a.kernel_layout != "IOHW" or a.out_layout != "NCHW" or int(a.groups) != 1
            or any(int(d) != 1 for d in a.dilation)
            or any(k % s or o % s for k, s, o in zip(kernel, strides, out_hw))):
        return _default("relax.nn.conv2d_transpose")(bb, call)
    return bb.call_te(conv2d_transpose_te, data, weight, strides=strides, padding=[int(p) for p in a.padding],
                      out_hw=out_hw, out_dtype=call.ty.dtype, primfunc_name_hint="conv2d_transpose")


def legalize(mod):
    """`mod` with its convolutions lowered to the TE computes above (the rest untouched)."""
    from tvm import relax

    return relax.transform.LegalizeOps(customize_legalize_map={
        "relax.nn.conv2d": _legalize_conv2d, "relax.nn.conv2d_transpose": _legalize_conv2d_transpose,
    })(mod)


# --------------------------------------------------------------------------------------------
# schedules


def _lanes_and_registers(target) -> tuple[int, int]:
    """(fp32 lanes per vector, vector registers) of an LLVM target."""
    from edgeflow.compile.ops.correlation import cpu_vector_lanes

    lanes = cpu_vector_lanes(target)
    triple = str(target.attrs.get("mtriple", ""))
    return lanes, 32 if lanes == 16 or triple.startswith("aarch64") else 16


def register_tile(channels: int, width: int, lanes: int, registers: int) -> tuple[int, int, int]:
    """(f, v, w): f output channels x v vectors of w output columns of accumulators, the most
    that fit in the registers with 4 left for operands; among equals, the fewest loads per
    step (f broadcasts + v vector loads)."""
    w = next(x for x in (lanes, lanes // 2, lanes // 4, 2, 1) if x >= 1 and width % x == 0)
    budget = registers - 4
    best = None
    for v in (1, 2, 3, 4):
        if width % (w * v):
            continue
        for f in range(1, channels + 1):
            if channels % f or f * v > budget:
                continue
            key = (f * v, -(f + v))
            if best is None or key > best[0]:
                best = (key, f, v)
    return best[1], best[2], w


def row_blocks(rows: int, most: int = 24) -> int:
    """The parallel blocks of output rows: the largest divisor of `rows` up to `most` (24: even
    shares for 1, 2, 3, 4, 6 and 8 threads)."""
    return max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)


class Conv(CPUScheduleRule):
    """Our conv2d / conv2d_transpose computes, with whatever elementwise ops FuseOps put after."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        for kind, pad_name in ((CONV, PAD), (DECONV, DECONV_PAD)):
            if kind in names and pad_name in names and names.index(pad_name) < names.index(kind):
                break
        else:
            return None
        main, pad = blocks[names.index(kind)], blocks[names.index(pad_name)]
        epilogue = blocks[names.index(kind) + 1:]
        for b in epilogue[:-1]:  # bias, activation, ...: into the last block
            sch.compute_inline(b)
        last = epilogue[-1] if epilogue else None
        lanes, registers = _lanes_and_registers(target)
        out = sch.get(main).writes[0].source
        channels, width = int(out.shape[1]), int(out.shape[-1])
        f, v, w = register_tile(channels, width, lanes, registers)
        if kind == CONV:
            n, o, y, x, rc, ry, rx = sch.get_loops(main)
            rows, phases = [y], []
        else:  # [n, o, yh, py, px, xh]: per row of each row phase, one column phase at a time
            n, o, yh, py, px, x, rc, ry, rx = sch.get_loops(main)
            rows, phases = [yh], [py, px]
            sh, sw = int(out.shape[3]), int(out.shape[4])
            if last is not None:  # the epilogue iterates the output in the same phases
                sch.transform_block_layout(last, lambda b, c, yy, xx: (b, c, yy // sh, yy % sh, xx % sw, xx // sw))
        oo, oi = sch.split(o, [None, f])
        xo, xv, xl = sch.split(x, [None, v, w])
        # blocks of output rows in parallel, each padding the input rows it reads (the halo rows
        # twice): one parallel region per convolution, not one for the padding and one for the rest
        rb, ri = sch.split(rows[0], [row_blocks(_extent(sch, rows[0])), None])
        sch.reorder(n, rb, oo, ri, *phases, xo, rc, ry, rx, oi, xv, xl)
        par = sch.fuse(n, rb)
        sch.parallel(par)
        sch.compute_at(pad, par)
        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, xo)
        if last is not None:
            sch.reverse_compute_inline(last)
        for lp in (rx, oi, xv):
            sch.unroll(lp)
        if w > 1:
            sch.vectorize(xl)
        init = sch.decompose_reduction(main, rc)
        if w > 1:
            sch.vectorize(sch.get_loops(init)[-1])
            sch.vectorize(sch.split(sch.get_loops(acc)[-1], [None, w])[1])
        return sch


class Winograd(CPUScheduleRule):
    """`winograd_conv2d_te` with its elementwise consumers. Per block of tile rows (in parallel):
    the padded input rows it reads; per tile row, V for every channel; per block of `f` output
    channels, the 16 products M in registers as in `Conv` (f channels x v vectors of tiles, the
    input channels streaming by), then Y with the epilogue, per row and column phase."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        if names[:5] != [WINO_PAD, WINO_V, WINO_M, WINO_Y, WINO_OUT]:
            return None
        pad, v, mm, y = blocks[:4]
        for b in blocks[4:-1]:  # the interleave, bias, activation, ...: into the last block
            sch.compute_inline(b)
        # which iterates the output per row and column phase, as Y, and is computed by Y
        sch.transform_block_layout(blocks[-1], lambda b, c, yy, xx: (b, c, yy // 2, yy % 2, xx % 2, xx // 2))
        sch.reverse_compute_inline(blocks[-1])
        lanes, registers = _lanes_and_registers(target)
        out = sch.get(mm).writes[0].source
        channels, width = int(out.shape[3]), int(out.shape[5])
        f, nv, w = register_tile(channels, width, lanes, registers)
        # the loop nest is Y's: blocks of tile rows in parallel, per tile row and channel block
        # the 16 M tiles Y reads (compute_at), computed like `Conv`'s register tile
        n, o, t, yi, yj, yu = sch.get_loops(y)
        oo, oi = sch.split(o, [None, f])
        tb, ti = sch.split(t, [row_blocks(_extent(sch, t)), None])
        sch.reorder(n, tb, ti, oo, oi, yi, yj, yu)
        par = sch.fuse(n, tb)
        sch.parallel(par)
        sch.compute_at(mm, oo)
        sch.compute_at(v, ti)  # V of this tile row, every channel
        sch.compute_at(pad, par)  # the padded input rows of this block
        xi, nu, mo, u, rc = sch.get_loops(mm)[-5:]  # compute_at leaves out the unit loops (n, t)
        uo, uv, ul = sch.split(u, [None, nv, w])
        sch.reorder(xi, nu, uo, rc, mo, uv, ul)
        acc = sch.cache_write(mm, 0, "local")
        sch.reverse_compute_at(acc, uo)
        for lp in (xi, nu, mo, uv):
            sch.unroll(lp)
        if w > 1:
            sch.vectorize(ul)
        init = sch.decompose_reduction(mm, rc)
        if w > 1:
            sch.vectorize(sch.get_loops(init)[-1])
            sch.vectorize(sch.split(sch.get_loops(acc)[-1], [None, w])[1])
        # V: 16 x channels x tiles (vectors; unrolling the 16 makes LLVM take minutes for 1 % here);
        # Y: per row phase i and column phase j (unrolled: A^T's signs fold), tiles in vectors
        vu = sch.get_loops(v)[-1]
        if w > 1 and _extent(sch, vu) % w == 0:
            sch.vectorize(sch.split(vu, [None, w])[1])
        sch.unroll(yi)
        sch.unroll(yj)
        if w > 1 and _extent(sch, yu) % w == 0:
            sch.vectorize(sch.split(yu, [None, w])[1])
        return sch


class Elementwise(CPUScheduleRule):
    """Any other PrimFunc: producers inlined, outer loops in parallel, the innermost vectorised;
    a reduction over contiguous data keeps `lanes` partial sums in a vector (rfactor)."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        lanes, _ = _lanes_and_registers(target)
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        for b in sch.get_child_blocks(root)[:-1]:
            try:
                sch.compute_inline(b)
            except s_tir.ScheduleError:  # a reduction, or read by more than elementwise: stays
                pass
        for b in sch.get_child_blocks(root):
            loops, iters = sch.get_loops(b), sch.get(b).iter_vars
            spatial = [it.iter_type == tirx.IterVar.DataPar for it in iters]
            if not loops or len(loops) != len(iters):
                continue
            if not all(spatial):
                n = spatial.index(False)
                if not all(spatial[:n]) or any(spatial[n:]) or n == 0:
                    continue
                rf = None
                if _extent(sch, loops[-1]) % lanes == 0:
                    r = sch.fuse(*loops[n:]) if len(loops) > n + 1 else loops[n]
                    rf = sch.rfactor(sch.split(r, [None, lanes])[1], 0)
                    loops = sch.get_loops(rf)
                    sch.vectorize(loops[-1])
                sch.parallel(sch.fuse(*loops[:n]) if n > 1 else loops[0])
                if rf is not None:
                    sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
                continue
            if len(loops) > 1 and _extent(sch, loops[-1]) % lanes == 0:
                outer, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)
                loops = loops[:-1] + [outer]
            sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        return sch


def _extent(sch, loop) -> int:
    """A loop's extent, 1 if not a constant (so that nothing divides by it)."""
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else 1


def schedule(mod, target=None):
    """Schedule every PrimFunc of `mod` not scheduled yet for the LLVM `target` (default: the
    current target)."""
    import contextlib

    import tvm.s_tir.dlight as dl

    with target if target is not None else contextlib.nullcontext():
        return dl.ApplyDefaultSchedule(Conv(), Winograd(), Elementwise())(mod)
