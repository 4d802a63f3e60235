"""int8 convolutions: TE computes, the Relax converter, the VNNI (x86), sdot (aarch64) and dp4a (CUDA) schedules.

The fake-quant ops `edgeflow::qconv2d` / `edgeflow::qdeconv2d` (`edgeflow.compile.quantize_torch`)
are mapped by the frontend to one PrimFunc each, marked `edgeflow.op` (opaque to FuseOps):

    ef_qpad   float NCHW -> uint8 [N, C/4, Hp, Wp, 4]: x / a_scale rounded half to even (as
              torch.round), + zero point, clamped to [0, 255]; padding (and the channels that
              round C up to 4) hold the zero point, i.e. float 0
    ef_qconv  uint8 x int8 -> int32 [N, O/16, OH, OW, 16], weights packed [O/16, C/4, KH, KW, 16, 4]
              (for a deconvolution, per output phase: [sh, sw, O/16, C/4, KH/sh, KW/sw, 16, 4],
              the sub-convolution of the taps that hit real input, as `cpu_schedules`)
    ef_qout   float NCHW: (acc - zp * sum(w)) * a_scale * w_scale[o] + bias[o], then LeakyReLU

So the compiled layer computes exactly the fake-quant torch layer's integers; only the float
rounding of the dequantized sums differs. The weight packing, the zero-point correction and the
combined scales depend on parameters only: `lower.prepare` lifts them out and runs them once at
compile time (the package stores packed int8 weights).

Schedule (`schedule_qconv`, LLVM): per output row and block of 16 output channels, a tile of `t`
output columns of 16 int32 lanes each accumulates in registers; the 4-input-channel x
16-output-channel inner product is one `vpdpbusd` (AVX-512 VNNI, `VNNI_INTRIN`); the epilogue
runs on the tile while it is in cache. aarch64 with the dot product (`aarch64-cpu`: `+dotprod`)
runs the same loops on int8 activations (`signed_variant`), the block as four NEON `sdot`
(`quantize_arm`), tiles of 4 columns (16 accumulator registers). Other CPUs get the same loops,
vectorised. CUDA (`schedule_qconv_cuda`): a thread per output value,
the 4-channel inner products as `__dp4a` on activations shifted to int8 (CUDA has no u8 x s8
dp4a); the correction input [2, ...] carries zp * sum(w) and sum(w), which undoes the shift.
"""

from __future__ import annotations

from edgeflow.compile.quantize_arm import SDOT_COLUMNS, SDOT_INTRIN, has_dotprod, register_sdot

QPAD, QCONV, QOUT = "ef_qpad", "ef_qconv", "ef_qout"
VNNI_INTRIN = "edgeflow_dot_16x4_vnni"
OC_BLOCK, IC_BLOCK = 16, 4


def check_int8_target(board) -> None:
    """InputError where edgeflow has no int8 kernels for `board`: CUDA boards before sm_61 (no dp4a)."""
    from edgeflow.errors import InputError

    if board.is_cuda and int(board.cuda_arch.split("_")[1]) < 61:
        raise InputError(f"precision='int8': {board.name} ({board.cuda_arch}) has no int8 dot product (dp4a needs "
                         f"sm_61 or newer); compile it as fp16 or fp32")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# the VNNI intrinsic (TVM's own `dot_16x4_vnni` does not build with the LLVM of TVM 0.27)


def register_vnni() -> str:
    """Register (once) the 16x4 u8 x s8 -> s32 dot product as `vpdpbusd` with its operands typed
    as LLVM's intrinsic wants them (uint8x64 / int8x64). Returns its name."""
    from tvm import s_tir
    from tvm.script import tirx as T

    from edgeflow.compile import dot_16x4

    if dot_16x4.registered(VNNI_INTRIN):
        return VNNI_INTRIN

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), a_u8, B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    s_tir.TensorIntrin.register(VNNI_INTRIN, dot_16x4.desc("uint8"), impl)
    return VNNI_INTRIN


def has_vnni(target) -> bool:
    """Whether the LLVM `target` (its -mcpu / -mattr, as LLVM reads them) has AVX-512 VNNI."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm" or not str(target.attrs.get("mtriple", "x86_64")).startswith("x86_64"):
        return False
    return bool(codegen.target_has_features("avx512vnni", target))


# --------------------------------------------------------------------------------------------
# TE computes


def _quantized(data, b, ch, y, x, a_scale, zp, signed):
    from tvm import tirx

    q = tirx.nearbyint(data[b, ch, y, x] / tirx.const(a_scale, "float32")) + tirx.const(float(zp), "float32")
    q = tirx.max(tirx.min(q, tirx.const(255.0, "float32")), tirx.const(0.0, "float32"))
    return (q - tirx.const(128.0, "float32")).astype("int8") if signed else q.astype("uint8")


def qpad_te(data, pad_hw, out_hw, a_scale, zp, signed=False):
    """uint8 [N, ceil(C/4), out_h, out_w, 4]: data quantized, at offset pad_hw, zp elsewhere
    (signed: int8, all shifted by -128, for targets whose dot products are signed x signed)."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in data.shape)
    pt, pl = pad_hw

    def value(b, c4, y, x, ci):
        ch, yy, xx = c4 * IC_BLOCK + ci, y - pt, x - pl
        inside = tirx.all(ch < c, yy >= 0, yy < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, _quantized(data, b, tirx.min(ch, c - 1), yy, xx, a_scale, zp, signed),
                                 tirx.const(zp - 128, "int8") if signed else tirx.const(zp, "uint8"))

    return te.compute((n, _ceil(c, IC_BLOCK), *out_hw, IC_BLOCK), value, name=QPAD)


def _dequantized(acc, corr, scale, bias, slope):
    """corr: (zp * sum(w), sum(w)); signed accumulators (activations - 128) add 128 * sum(w)."""
    from tvm import tirx

    y = (acc - corr).astype("float32") * scale + bias
    return y if slope is None else tirx.Select(y >= tirx.const(0.0, "float32"), y, y * tirx.const(slope, "float32"))


def qconv2d_te(data, wpack, corr, scale, bias, *, strides, padding, kernel, out_channels, a_scale, zp, slope,
               signed=False):
    """Quantized NCHW convolution (see the module docstring); wpack [O/16, C/4, KH, KW, 16, 4],
    corr [2, O] (zp * sum of weights, sum of weights)."""
    from tvm import te

    n, c, h, w = (int(v) for v in data.shape)
    kh, kw = kernel
    sh, sw = strides
    pt, pl, pb, pr = padding
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    qin = qpad_te(data, (pt, pl), ((oh - 1) * sh + kh, (ow - 1) * sw + kw), a_scale, zp, signed)
    o16, c4 = int(wpack.shape[0]), int(wpack.shape[1])
    rc, ry, rx, ri = (te.reduce_axis((0, e), nm) for e, nm in ((c4, "rc"), (kh, "ry"), (kw, "rx"), (IC_BLOCK, "ri")))
    acc = te.compute(
        (n, o16, oh, ow, OC_BLOCK),
        lambda b, oo, y, x, oi: te.sum(qin[b, rc, y * sh + ry, x * sw + rx, ri].astype("int32")
                                       * wpack[oo, rc, ry, rx, oi, ri].astype("int32"), axis=[rc, ry, rx, ri]),
        name=QCONV)
    return te.compute((n, out_channels, oh, ow),
                      lambda b, o, y, x: _dequantized(acc[b, o // OC_BLOCK, y, x, o % OC_BLOCK],
                                                      _corr(corr, (o,), signed), scale[o], bias[o], slope),
                      name=QOUT)


def _corr(corr, index, signed):
    return corr[(0, *index)] - 128 * corr[(1, *index)] if signed else corr[(0, *index)]


def deconv_geometry(in_hw, kernel, strides, padding, out_hw):
    """(taps per phase, low pad, high pad) of the phase-split transposed convolution."""
    (h, w), (kh, kw), (sh, sw), (pt, pl) = in_hw, kernel, strides, padding
    oh, ow = out_hw
    th, tw = kh // sh, kw // sw
    lo = (th - 1, tw - 1)
    hi = (max(0, oh // sh - 1 + (sh - 1 + pt) // sh - (h - 1)), max(0, ow // sw - 1 + (sw - 1 + pl) // sw - (w - 1)))
    return (th, tw), lo, hi


def qdeconv2d_te(data, wpack, corr, scale, bias, *, strides, padding, kernel, out_hw, out_channels, a_scale, zp,
                 slope, signed=False):
    """Quantized NCHW x IOHW transposed convolution, one sub-convolution per output phase;
    wpack [sh, sw, O/16, C/4, KH/sh, KW/sw, 16, 4], corr [2, sh, sw, O]."""
    from tvm import te

    n, c, h, w = (int(v) for v in data.shape)
    sh, sw = strides
    pt, pl = padding[0], padding[1]
    oh, ow = out_hw
    (th, tw), lo, hi = deconv_geometry((h, w), kernel, strides, (pt, pl), out_hw)
    qin = qpad_te(data, lo, (h + lo[0] + hi[0], w + lo[1] + hi[1]), a_scale, zp, signed)
    o16, c4 = int(wpack.shape[2]), int(wpack.shape[3])
    rc, ty, tx, ri = (te.reduce_axis((0, e), nm) for e, nm in ((c4, "rc"), (th, "ty"), (tw, "tx"), (IC_BLOCK, "ri")))

    def phase(b, oo, yh, py, px, xh, oi):
        iy = yh + (py + pt) // sh - ty + lo[0]
        ix = xh + (px + pl) // sw - tx + lo[1]
        return te.sum(qin[b, rc, iy, ix, ri].astype("int32") * wpack[py, px, oo, rc, ty, tx, oi, ri].astype("int32"),
                      axis=[rc, ty, tx, ri])

    acc = te.compute((n, o16, oh // sh, sh, sw, ow // sw, OC_BLOCK), phase, name=QCONV)

    def out(b, o, y, x):
        a = acc[b, o // OC_BLOCK, y // sh, y % sh, x % sw, x // sw, o % OC_BLOCK]
        return _dequantized(a, _corr(corr, (y % sh, x % sw, o), signed), scale[o], bias[o], slope)

    return te.compute((n, out_channels, oh, ow), out, name=QOUT)


def pack_conv_weight_te(wq):
    """int8 OIHW -> [O/16, C/4, KH, KW, 16, 4], zero beyond O and C."""
    from tvm import te, tirx

    o, c, kh, kw = (int(v) for v in wq.shape)

    def value(oo, c4, y, x, oi, ci):
        oc, ic = oo * OC_BLOCK + oi, c4 * IC_BLOCK + ci
        return tirx.if_then_else(tirx.all(oc < o, ic < c), wq[tirx.min(oc, o - 1), tirx.min(ic, c - 1), y, x],
                                 tirx.const(0, "int8"))

    return te.compute((_ceil(o, OC_BLOCK), _ceil(c, IC_BLOCK), kh, kw, OC_BLOCK, IC_BLOCK), value, name="ef_wpack")


def pack_deconv_weight_te(wq, strides, padding):
    """int8 IOHW -> per output phase [sh, sw, O/16, C/4, KH/sh, KW/sw, 16, 4] (tap ky = sh*ty +
    (py + pad) % sh, as `cpu_schedules.conv2d_transpose_te`), zero beyond O and C."""
    from tvm import te, tirx

    c, o, kh, kw = (int(v) for v in wq.shape)
    sh, sw = strides
    pt, pl = padding

    def value(py, px, oo, c4, ty, tx, oi, ci):
        oc, ic = oo * OC_BLOCK + oi, c4 * IC_BLOCK + ci
        return tirx.if_then_else(tirx.all(oc < o, ic < c),
                                 wq[tirx.min(ic, c - 1), tirx.min(oc, o - 1), sh * ty + (py + pt) % sh,
                                    sw * tx + (px + pl) % sw], tirx.const(0, "int8"))

    return te.compute((sh, sw, _ceil(o, OC_BLOCK), _ceil(c, IC_BLOCK), kh // sh, kw // sw, OC_BLOCK, IC_BLOCK), value,
                      name="ef_wpack")


def correction_te(wpack, out_channels, zp, deconv):
    """int32 (zp * sum of a channel's packed weights, that sum): [2, O] (conv) or [2, sh, sw, O]
    (deconv, per output phase)."""
    from tvm import te, tirx

    def factor(k):
        return tirx.if_then_else(k == 0, tirx.const(zp, "int32"), tirx.const(1, "int32"))

    if not deconv:
        _, c4, kh, kw, _, _ = (int(v) for v in wpack.shape)
        r = [te.reduce_axis((0, e)) for e in (c4, kh, kw, IC_BLOCK)]
        return te.compute((2, out_channels), lambda k, o: te.sum(
            wpack[o // OC_BLOCK, r[0], r[1], r[2], o % OC_BLOCK, r[3]].astype("int32") * factor(k), axis=r),
            name="ef_corr")
    sh, sw, _, c4, th, tw, _, _ = (int(v) for v in wpack.shape)
    r = [te.reduce_axis((0, e)) for e in (c4, th, tw, IC_BLOCK)]
    return te.compute((2, sh, sw, out_channels), lambda k, py, px, o: te.sum(
        wpack[py, px, o // OC_BLOCK, r[0], r[1], r[2], o % OC_BLOCK, r[3]].astype("int32") * factor(k), axis=r),
        name="ef_corr")


# --------------------------------------------------------------------------------------------
# schedule


def column_tile(width: int, most: int = 16) -> int:
    """Output columns per register tile: the largest divisor of `width` up to `most`."""
    return next(t for t in range(min(most, width), 0, -1) if width % t == 0)


def schedule_qconv(func, target, board=None):
    """`func` (a qconv2d / qdeconv2d PrimFunc) scheduled for the LLVM `target`, marked
    `tirx.is_scheduled`. See the module docstring."""
    from tvm import s_tir

    from edgeflow.errors import InputError

    if str(target.kind.name) == "cuda":
        return schedule_qconv_cuda(func, target, board)
    if str(target.kind.name) != "llvm":
        raise InputError(f"precision='int8': no int8 kernels for {target.kind.name} targets (CPU and CUDA only)")
    intrin = None
    if has_vnni(target):
        intrin = register_vnni()
    elif has_dotprod(target):  # sdot is signed x signed: activations shifted to int8
        intrin, func = register_sdot(), signed_variant(func)
    sch = s_tir.Schedule(func)
    pad, conv, out = sch.get_sblock(QPAD), sch.get_sblock(QCONV), sch.get_sblock(QOUT)
    loops = sch.get_loops(conv)
    if len(loops) == 11:  # deconvolution: [n, o/16, yh, py, px, xh, 16 | c/4, ty, tx, 4]
        n, oo, y, py, px, x, oi, rc, ry, rx, ri = loops
        phases = [py, px]
        at = py  # the epilogue runs per output row, once both column phases are done (regions
        # of reverse_compute_at are intervals: a phase's columns are not one)
    else:  # [n, o/16, y, x, 16 | c/4, ky, kx, 4]
        n, oo, y, x, oi, rc, ry, rx, ri = loops
        phases, at = [], None
    width = int(sch.get(x).extent)
    xo, xi = sch.split(x, [None, column_tile(width, SDOT_COLUMNS if intrin == SDOT_INTRIN else 16)])
    sch.reorder(n, oo, y, *phases, xo, rc, ry, rx, *((xi, oi, ri) if intrin else (ri, xi, oi)))
    sch.reverse_compute_at(out, xo if at is None else at)
    sch.parallel(sch.fuse(n, oo, y))
    if not intrin:  # before the init is split off: vectorize needs the whole reduction block
        sch.unroll(ri)
        sch.vectorize(oi)
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(xi)
    if intrin:
        sch.tensorize(oi, intrin)
    out_loops = sch.get_loops(out)
    sch.vectorize(out_loops[-1]) if int(sch.get(out_loops[-1]).extent) in (4, 8, 16) else None
    sch.parallel(sch.fuse(*sch.get_loops(pad)[:3]))
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})


# --------------------------------------------------------------------------------------------
# frontend: the fake-quant torch ops -> call_tir of the PrimFuncs above

_ARGS = ("x", "weight", "w_scale", "bias", "a_scale", "zero_point", "stride", "padding", "slope")


def emit_qconv(bb, x, weight, w_scale, bias, *, a_scale: float, zero_point: int, stride: int, padding: int,
               slope: float, deconv: bool):
    """Emit one quantized (transposed) convolution into Relax BlockBuilder `bb`: the weight
    packing, zero-point correction and scales (parameter-only, lifted out by `lower.prepare`),
    then `call_tir` of the opaque qconv2d / qdeconv2d PrimFunc."""
    from tvm import relax

    n, c, h, w = (int(v) for v in x.ty.shape.values)
    wshape = [int(v) for v in weight.ty.shape.values]
    o = wshape[1] if deconv else wshape[0]
    kernel, strides = (wshape[2], wshape[3]), (stride, stride)
    if deconv:
        wpack = _emit_once(bb, pack_deconv_weight_te, [weight], "qpack", strides, (padding, padding))
        out_hw = ((h - 1) * stride - 2 * padding + kernel[0], (w - 1) * stride - 2 * padding + kernel[1])
    else:
        wpack = _emit_once(bb, pack_conv_weight_te, [weight], "qpack")
        out_hw = ((h + 2 * padding - kernel[0]) // stride + 1, (w + 2 * padding - kernel[1]) // stride + 1)
    corr = _emit_once(bb, correction_te, [wpack], "qcorr", o, int(zero_point), deconv)
    scale = bb.emit(relax.op.multiply(w_scale, relax.const(float(a_scale), "float32")))
    params = {"a_scale": float(a_scale), "zero_point": int(zero_point), "stride": int(stride),
              "padding": int(padding), "slope": float(slope)}
    shapes = [[int(v) for v in t.ty.shape.values] for t in (x, wpack, corr)] + [[n, o, *out_hw]]
    gv = bb.add_func(qconv_primfunc("qdeconv2d" if deconv else "qconv2d", shapes, params), "qdeconv2d" if deconv
                     else "qconv2d")
    return bb.emit(relax.call_tir(gv, [x, wpack, corr, scale, bias], relax.TensorType([n, o, *out_hw], "float32")))


def qconv_primfunc(op: str, shapes, params: dict, signed: bool = False):
    """The unscheduled PrimFunc (x, wpack, corr, scale, bias) -> out of `op` ("qconv2d" or
    "qdeconv2d") for the buffer `shapes` [x, wpack, corr, out] and the layer's `params`
    (a_scale, zero_point, stride, padding, slope), marked `edgeflow.op`; signed: int8
    activations shifted by -128 (for signed x signed dot products)."""
    from tvm import te

    from edgeflow.compile.ops import OP_ATTR, OPAQUE, PARAMS_ATTR

    xs, ws, cs, os_ = shapes
    o = os_[1]
    tx = te.placeholder(xs, "float32", "x")
    tw = te.placeholder(ws, "int8", "wpack")
    tc = te.placeholder(cs, "int32", "corr")
    ts, tb = te.placeholder((o,), "float32", "scale"), te.placeholder((o,), "float32", "bias")
    stride, padding, slope = int(params["stride"]), int(params["padding"]), float(params["slope"])
    kwargs = dict(strides=(stride, stride), out_channels=o, a_scale=float(params["a_scale"]),
                  zp=int(params["zero_point"]), slope=None if slope == 1.0 else slope, signed=signed)
    if op == "qdeconv2d":
        kernel = (ws[4] * ws[0], ws[5] * ws[1])
        out = qdeconv2d_te(tx, tw, tc, ts, tb, padding=(padding, padding), kernel=kernel, out_hw=tuple(os_[2:]),
                           **kwargs)
    else:
        out = qconv2d_te(tx, tw, tc, ts, tb, padding=(padding,) * 4, kernel=(ws[2], ws[3]), **kwargs)
    return te.create_prim_func([tx, tw, tc, ts, tb, out]).without_attr("global_symbol").with_attrs(
        {OP_ATTR: op, PARAMS_ATTR: dict(params), **OPAQUE})


def signed_variant(func):
    """The qconv2d / qdeconv2d PrimFunc `func` rebuilt with int8 activations (uint8 - 128), for
    signed x signed dot products (CUDA dp4a, NEON sdot); same parameters, same result."""
    from edgeflow.compile.ops import OP_ATTR, PARAMS_ATTR

    attrs = func.attrs[PARAMS_ATTR]
    params = {k: (float(attrs[k]) if k in ("a_scale", "slope") else int(attrs[k]))
              for k in ("a_scale", "zero_point", "stride", "padding", "slope")}
    shapes = [[int(d) for d in p.shape] for p in (func.params[0], func.params[1], func.params[2], func.params[5])]
    return qconv_primfunc(str(func.attrs[OP_ATTR]), shapes, params, signed=True)


def _emit_once(bb, te_func, inputs, name, *args):
    """call_tir of `te_func(*placeholders, *args)`, a parameter transform that runs once at
    compile time (`lower.prepare`): plain loops, marked scheduled so that no CPU rule touches it."""
    from tvm import relax, te

    holders = [te.placeholder([int(v) for v in x.ty.shape.values], str(x.ty.dtype), f"in{i}")
               for i, x in enumerate(inputs)]
    out = te_func(*holders, *args)
    func = te.create_prim_func([*holders, out]).without_attr("global_symbol").with_attrs(
        {"tirx.is_scheduled": True, "tir.is_scheduled": True})
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, inputs, relax.TensorType([int(v) for v in out.shape], out.dtype)))


def convert(node, importer, deconv: bool):
    """custom_convert_map entry for `edgeflow::qconv2d` / `edgeflow::qdeconv2d`."""
    from edgeflow.compile.ops import node_args

    args = node_args(node, _ARGS)
    env = importer.env
    return emit_qconv(importer.block_builder, env[args["x"]], env[args["weight"]], env[args["w_scale"]],
                      env[args["bias"]], a_scale=float(args["a_scale"]), zero_point=int(args["zero_point"]),
                      stride=int(args["stride"]), padding=int(args["padding"]), slope=float(args["slope"]),
                      deconv=deconv)


# --------------------------------------------------------------------------------------------
# CUDA: dp4a

DP4A_INTRIN = "edgeflow_dp4a_s8s8s32"


def register_dp4a() -> str:
    """Register (once) the 4-wide s8 x s8 -> s32 dot product as CUDA's `__dp4a` (CUDA has no
    mixed-sign overload: activations go signed, shifted by -128), operands read straight from
    global memory (4-byte aligned: the packed layouts keep the 4 channels last)."""
    from tvm import s_tir
    from tvm.script import tirx as T

    try:
        s_tir.TensorIntrin.get(DP4A_INTRIN)
        return DP4A_INTRIN
    except Exception:  # noqa: BLE001 - not registered yet
        pass

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1, align=4), B: T.Buffer((4,), "int8", offset_factor=1, align=4),
             C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(0, 4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1, align=4), B: T.Buffer((4,), "int8", offset_factor=1, align=4),
             C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] += T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), T.int32(0),
                                       dtype="int32")

    s_tir.TensorIntrin.register(DP4A_INTRIN, desc, impl)
    return DP4A_INTRIN


def schedule_qconv_cuda(func, target, board=None):
    """`func` scheduled for CUDA: one thread per output column x output channel of a tile of a
    row (block: 16 channels x up to 16 columns), int32 accumulator in a register, the 4-channel
    inner products as `__dp4a` (sm_61+: the Jetsons' sm_72 and sm_87); quantize+pad and the
    dequantize epilogue as elementwise kernels. Activations are int8 (uint8 - 128; CUDA's dp4a is
    signed x signed or unsigned x unsigned), the weight sums in `corr` undo the shift."""
    from tvm import s_tir

    sch = s_tir.Schedule(signed_variant(func))
    pad, conv, out = sch.get_sblock(QPAD), sch.get_sblock(QCONV), sch.get_sblock(QOUT)
    for block in (pad, out):
        bx, tx = sch.split(sch.fuse(*sch.get_loops(block)), [None, 256])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    loops = sch.get_loops(conv)
    if len(loops) == 11:
        n, oo, y, py, px, x, oi, rc, ry, rx, ri = loops
        rows = [n, oo, y, py, px]
    else:
        n, oo, y, x, oi, rc, ry, rx, ri = loops
        rows = [n, oo, y]
    xo, xi = sch.split(x, [None, column_tile(int(sch.get(x).extent))])
    sch.reorder(*rows, xo, xi, oi, rc, ry, rx, ri)
    sch.bind(sch.fuse(*rows, xo), "blockIdx.x")
    thread = sch.fuse(xi, oi)
    sch.bind(thread, "threadIdx.x")
    acc = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(acc, thread)
    sch.decompose_reduction(conv, rc)
    sch.tensorize(ri, register_dp4a())
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})
