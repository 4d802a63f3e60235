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
Anything else keeps TVM's legalization.

`schedule(mod, target)` is a dlight pass (`ApplyDefaultSchedule`) with two rules:
- `Conv`: the PrimFuncs holding one of our convolutions (after FuseOps: with its bias, LeakyReLU
  and other elementwise consumers). Per output row and block of `f` output channels, `v` vectors
  of `lanes` output columns accumulate in registers while the input channels and kernel taps
  stream by (input: a vector load per tap, weights: a broadcast), then the epilogue writes them.
  `f` and `v` fill the target's vector registers. Blocks of output rows run in parallel, each
  padding the input rows it reads first: one parallel region (one wake-up of the thread pool)
  per convolution. 24 blocks where the rows divide (even shares for 1-4, 6 and 8 threads).
- `Elementwise`: every other PrimFunc (concat, resize, pad, casts, reductions): producers
  inlined, outer loops fused and parallel, innermost loop vectorised where it divides; a
  reduction over contiguous data (the images' mean) sums in vector lanes (rfactor).
Hand-scheduled PrimFuncs (correlation, warp) carry `tirx.is_scheduled` and are left alone.

No tuning: TVM 0.27 has no CPU schedules for convolutions besides MetaSchedule's search
(`static_shape_tuning` pipeline); its dlight CPU rules cover GEMV and softmax-like reductions.
flownet2-s at 384x512 on one Zen 4 core: ~4.3 s unscheduled, ~55 ms with these (ONNX Runtime
~58 ms); the convolutions run at ~90-110 GFLOP/s (`edgeflow bench` measures it).
"""

from __future__ import annotations

from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

PAD, CONV, DECONV_PAD, DECONV, DECONV_OUT = "ef_pad", "ef_conv", "ef_dpad", "ef_deconv", "ef_deconv_out"


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
        return dl.ApplyDefaultSchedule(Conv(), Elementwise())(mod)
