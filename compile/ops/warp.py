"""Backward bilinear warping (FlowNet2's FlowWarp) as TIR, with CUDA and CPU schedules.

out[n, c, y, x] = image sampled bilinearly at (x2, y2) = (x + u, y + v), (u, v) = flow[n, :, y, x]
in pixels, exactly as Caffe's FlowWarp (lmb-freiburg/flownet2, fill_value ZERO) and
`edgeflow.models.ops.warp_reference`: 0 unless 0 <= x2 < W and 0 <= y2 < H; inside, the
right/bottom neighbour is clamped to the last column/row. Inputs fp32 or fp16, arithmetic in fp32.

One block, `warp`. The coordinates and weights of a pixel are the same for all its channels:
both schedules give a thread (CUDA) or a loop iteration (CPU) one pixel and unroll the channels
inside it, so they are computed once per pixel (common subexpressions after unrolling).
"""

from __future__ import annotations

from edgeflow.compile.ops import OP_ATTR, OPAQUE, PARAMS_ATTR, gpu_board, is_cuda, launch_bounds, node_args
from edgeflow.errors import InputError, InternalError

ACC = "float32"
MAX_UNROLLED_CHANNELS = 16


def warp_te(image, flow, dtype: str):
    """TE compute: image [B, C, H, W], flow [B, 2, H, W] -> warped image [B, C, H, W]."""
    from tvm import te, tirx

    b, c, h, w = (int(s) for s in image.shape)
    zero, one = tirx.const(0, ACC), tirx.const(1, ACC)

    def fn(n, ch, y, x):
        x2 = x.astype(ACC) + flow[n, 0, y, x].astype(ACC)
        y2 = y.astype(ACC) + flow[n, 1, y, x].astype(ACC)
        inside = tirx.all(x2 >= zero, y2 >= zero, x2 < tirx.const(w, ACC), y2 < tirx.const(h, ACC))
        # a point outside samples (0, 0) and is masked: indices stay in range, no int cast of NaN
        x2, y2 = tirx.Select(inside, x2, zero), tirx.Select(inside, y2, zero)
        xlf, ytf = te.floor(x2), te.floor(y2)
        alpha, beta = x2 - xlf, y2 - ytf
        xl, yt = xlf.astype("int32"), ytf.astype("int32")
        xr, yb = te.min(xl + 1, w - 1), te.min(yt + 1, h - 1)

        def at(yi, xi):
            return image[n, ch, yi, xi].astype(ACC)

        total = ((one - alpha) * (one - beta) * at(yt, xl) + alpha * (one - beta) * at(yt, xr)
                 + (one - alpha) * beta * at(yb, xl) + alpha * beta * at(yb, xr))
        return te.if_then_else(inside, total, zero).astype(dtype)

    return te.compute((b, c, h, w), fn, name="warp")


def warp_primfunc(image_shape, *, dtype: str = "float32"):
    """Unscheduled PrimFunc `(image, flow, out)` of backward warping, with the attributes
    `edgeflow.op = "warp"` and `edgeflow.params`."""
    from tvm import te

    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 4:
        raise InputError(f"warp image must be NCHW, got shape {shape}")
    if dtype not in ("float32", "float16"):
        raise InputError(f"warp dtype must be float32 or float16, got {dtype}")
    image = te.placeholder(shape, dtype, "image")
    flow = te.placeholder((shape[0], 2, shape[2], shape[3]), dtype, "flow")
    func = te.create_prim_func([image, flow, warp_te(image, flow, dtype)]).without_attr("global_symbol")
    return func.with_attrs({OP_ATTR: "warp", PARAMS_ATTR: {"dtype": dtype}, **OPAQUE})


def _schedule_cuda(func, board):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("warp")
    n, c, y, x = sch.get_loops(blk)
    b, ch, h, w = (int(s) for s in func.params[0].shape)
    pixels = b * h * w
    # one pixel per thread, consecutive x in consecutive lanes (coalesced flow reads and stores);
    # 256 threads unless that leaves SMs idle
    threads = min(256, board.max_threads_per_block)
    while threads > 64 and -(-pixels // threads) < 2 * board.sm_count:
        threads //= 2
    sch.reorder(n, y, x, c)
    fused = sch.fuse(n, y, x)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if ch <= MAX_UNROLLED_CHANNELS:
        sch.unroll(c)
    # half the SM's threads resident: registers enough for the fp16 kernel on the Nano (full
    # occupancy leaves 32 per thread there, and ptxas spills to reach it)
    return launch_bounds(sch.mod["main"], max(1, board.max_threads_per_sm // threads // 2))


def _schedule_cpu(func):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("warp")
    n, c, y, x = sch.get_loops(blk)
    ch = int(func.params[0].shape[1])
    # rows in parallel; per pixel the channels unrolled (the gathers do not vectorise)
    sch.reorder(n, y, x, c)
    sch.parallel(sch.fuse(n, y))
    if ch <= MAX_UNROLLED_CHANNELS:
        sch.unroll(c)
    return sch.mod["main"]


def schedule_warp(func, target, board=None):
    """The hand-scheduled form of `func` (from `warp_primfunc`) for a CUDA or LLVM `target`
    (CUDA: for `board` of the targets table, see `gpu_board`), marked `tirx.is_scheduled`."""
    import tvm

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if is_cuda(target):
        sched = _schedule_cuda(func, gpu_board(board, target))
    elif str(target.kind.name) == "llvm":
        sched = _schedule_cpu(func)
    else:
        raise InternalError(f"no warp schedule for target kind {target.kind.name}")
    return sched.with_attrs({OP_ATTR: "warp", PARAMS_ATTR: func.attrs[PARAMS_ATTR],
                             "tirx.is_scheduled": True, "tir.is_scheduled": True})


def emit_warp(bb, image, flow):
    """Emit `call_tir` of the unscheduled warp PrimFunc into Relax BlockBuilder `bb`."""
    from tvm import relax

    shape = [int(s) for s in image.ty.shape.values]
    dtype = str(image.ty.dtype)
    flow_shape = [int(s) for s in flow.ty.shape.values]
    if flow_shape != [shape[0], 2, shape[2], shape[3]]:
        raise InputError(f"warp: flow shape {flow_shape} does not match image shape {shape}")
    if str(flow.ty.dtype) != dtype:
        flow = bb.emit(relax.op.astype(flow, dtype))
    gv = bb.add_func(warp_primfunc(shape, dtype=dtype), "warp")
    return bb.emit(relax.call_tir(gv, [image, flow], relax.TensorType(shape, dtype)))


def convert_warp(node, importer):
    """custom_convert_map entry for `edgeflow::warp`: (fx node, importer) -> relax var."""
    args = node_args(node, ("image", "flow"))
    return emit_warp(importer.block_builder, importer.env[args["image"]], importer.env[args["flow"]])
