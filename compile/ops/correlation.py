"""FlowNet correlation as TIR: the compute, hand schedules for CUDA and CPUs, the Relax emitter.

out[n, (p+R)*D + (o+R), i, j] = act(sum_{c,ky,kx} f1[n, c, y+ky, x+kx] * f2[n, c, y+ky+p*s2, x+kx+o*s2]
                                     / (k*k*C))
with y = i*s1 + md - pad, x = j*s1 + md - pad, R = md // s2, D = 2R + 1, values outside the input
zero, act the identity or a LeakyReLU. Inputs are fp32 or fp16; products and sums are fp32.

The PrimFunc has four blocks, which the schedules know by name: `f1_stage` and `f2_stage`
(zero padding and the cast to fp32; a stage that tests columns is kept as [.., Wp/g, g] so its
tests are per group of g columns), `corr` (the fp32 reduction into [B, D, D, Ho, Wo]) and `out`
(scale, activation, cast, into [B, D*D, Ho, Wo]).

CUDA: a block owns a tile of output pixels and a band of displacement rows; per chunk of
channels it stages the first features' tile and the second features' window (the tile plus
the displacement halo) in shared memory with cooperative, vectorised loads, then every thread
accumulates a register tile of (displacement rows x displacement columns x pixels) from
register copies of both. Tile sizes come from `plan_cuda` and the board's entry in the targets
table; the kernel is launch-bounded for the occupancy the plan aims at.

CPU: rows in parallel; the second features padded once into a scratch buffer; for each pixel
row, displacement row and strip of pixels, the accumulators of all displacement columns stay in
vector registers while the channels stream by (vectorised over pixels: for a fixed
displacement both feature rows are contiguous in x, so every load is a plain vector load).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgeflow.compile.ops import OP_ATTR, OPAQUE, PARAMS_ATTR, gpu_board, is_cuda, launch_bounds, node_args
from edgeflow.errors import InputError, InternalError
from edgeflow.models.shapes import correlation_output_size

ACC = "float32"


@dataclass(frozen=True)
class CorrelationSpec:
    """Shapes and parameters of one correlation."""

    batch: int
    channels: int
    height: int
    width: int
    kernel_size: int = 1
    max_displacement: int = 20
    stride1: int = 1
    stride2: int = 2
    pad: int = 20
    dtype: str = "float32"
    leaky_slope: float | None = None

    def __post_init__(self):
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise InputError(f"correlation kernel_size must be odd and positive, got {self.kernel_size}")
        if self.stride1 < 1 or self.stride2 < 1 or self.max_displacement < 0 or self.pad < 0:
            raise InputError("correlation strides must be >= 1, max_displacement and pad >= 0")
        if self.dtype not in ("float32", "float16"):
            raise InputError(f"correlation dtype must be float32 or float16, got {self.dtype}")
        self.out_hw  # raises when the input is too small

    @property
    def radius(self) -> int:
        return self.max_displacement // self.stride2

    @property
    def grid(self) -> int:
        """D: displacements per axis."""
        return 2 * self.radius + 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return correlation_output_size(self.height, self.width, kernel_size=self.kernel_size,
                                       max_displacement=self.max_displacement, stride1=self.stride1, pad=self.pad)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.grid * self.grid, *self.out_hw)

    @property
    def group(self) -> int:
        """g: columns per group of a stage that tests x. It divides the padding and the width
        (so the tests are exact on groups) and every column offset the correlation adds
        (max_displacement, radius*stride2), so that the schedules' simplifier folds
        (x // g) * g + x % g back into x; 1 when no such g > 1 exists."""
        offsets = (self.pad, self.width, self.max_displacement, self.radius * self.stride2)
        return next(v for v in (16, 8, 4, 2, 1) if all(o % v == 0 for o in offsets))

    def stage_reach(self, which: int) -> tuple[int, int, int]:
        """(first, last row, last column) of the padded input `which` (1 or 2) the op reads."""
        oh, ow = self.out_hw
        md, s1, k = self.max_displacement, self.stride1, self.kernel_size
        halo = 0 if which == 1 else self.radius * self.stride2
        return md - halo, md + (oh - 1) * s1 + k - 1 + halo, md + (ow - 1) * s1 + k - 1 + halo

    def stage_tests(self, which: int) -> tuple[bool, bool, bool]:
        """Which bounds stage `which` must test: (low rows and columns, high rows, high columns)."""
        lo, hi_y, hi_x = self.stage_reach(which)
        return lo < self.pad, hi_y >= self.height + self.pad, hi_x >= self.width + self.pad

    def stage_group(self, which: int) -> int:
        """g if stage `which` is kept as [.., Wp/g, g] (it tests columns), else 1."""
        low, _, high_x = self.stage_tests(which)
        return self.group if (low or high_x) else 1

    @property
    def flops(self) -> int:
        """Multiply-adds count twice."""
        oh, ow = self.out_hw
        return 2 * self.batch * self.grid ** 2 * oh * ow * self.channels * self.kernel_size ** 2

    def attrs(self) -> dict:
        out = {"kernel_size": self.kernel_size, "max_displacement": self.max_displacement,
               "stride1": self.stride1, "stride2": self.stride2, "pad": self.pad, "dtype": self.dtype}
        if self.leaky_slope is not None:
            out["leaky_slope"] = float(self.leaky_slope)
        return out

    @classmethod
    def of(cls, func) -> "CorrelationSpec":
        """The spec of a PrimFunc made by `correlation_primfunc`."""
        p = func.attrs[PARAMS_ATTR]
        shape = [int(s) for s in func.params[0].shape]
        slope = float(p["leaky_slope"]) if "leaky_slope" in p else None
        return cls(*shape, kernel_size=int(p["kernel_size"]), max_displacement=int(p["max_displacement"]),
                   stride1=int(p["stride1"]), stride2=int(p["stride2"]), pad=int(p["pad"]),
                   dtype=str(p["dtype"]), leaky_slope=slope)


# --------------------------------------------------------------------------------------------
# compute


def correlation_te(f1, f2, spec: CorrelationSpec):
    """The TE compute: `f1`, `f2` placeholders [B, C, H, W] -> output tensor [B, D*D, Ho, Wo]."""
    from tvm import te, tirx

    b, c, h, w = spec.batch, spec.channels, spec.height, spec.width
    k, md, s1, s2, pad, r, d = (spec.kernel_size, spec.max_displacement, spec.stride1, spec.stride2,
                                spec.pad, spec.radius, spec.grid)
    oh, ow = spec.out_hw
    hp, wp = h + 2 * pad, w + 2 * pad

    # A stage that tests columns is kept in groups of g columns, as a 5-D tensor [.., Wp/g, g]: the
    # test then involves the group index only, and a copy vectorised over the columns of a group
    # keeps plain vector loads (a test per lane would scalarise it).
    def stage(f, which, name):
        """Zero padding and the cast to fp32, with bounds tests only on the sides the correlation
        reaches; returns an accessor in padded NCHW coordinates."""
        low, high_y, high_x = spec.stage_tests(which)
        g = spec.stage_group(which)

        def value(n, ch, y, xg, x):
            cs = ([y >= pad, xg >= pad // g] if low else []) + ([y < h + pad] if high_y else []) + (
                [xg < (w + pad) // g] if high_x else [])
            v = f[n, ch, y - pad, x - pad].astype(ACC)
            return te.if_then_else(tirx.all(*cs), v, tirx.const(0, ACC)) if cs else v

        if g > 1:
            t = te.compute((b, c, hp, wp // g, g),
                           lambda n, ch, y, xg, xi: value(n, ch, y, xg, xg * g + xi), name=name)
            return lambda n, ch, y, x: t[n, ch, y, x // g, x % g]
        t = te.compute((b, c, hp, wp), lambda n, ch, y, x: value(n, ch, y, x, x), name=name)
        return lambda n, ch, y, x: t[n, ch, y, x]

    p1 = stage(f1, 1, "f1_stage")
    p2 = stage(f2, 2, "f2_stage")
    rc = te.reduce_axis((0, c), "c")
    axes = [rc]
    if k > 1:
        ry, rx = te.reduce_axis((0, k), "ky"), te.reduce_axis((0, k), "kx")
        axes += [ry, rx]
    else:
        ry = rx = 0

    def corr(n, p, o, i, j):
        y1, x1 = i * s1 + md + ry, j * s1 + md + rx
        return te.sum(p1(n, rc, y1, x1) * p2(n, rc, y1 + (p - r) * s2, x1 + (o - r) * s2), axis=axes)

    # [B, D, D, Ho, Wo]: displacement rows and columns stay separate axes, so that a thread's
    # accumulators form one box of the buffer (a fused channel axis would make them strided)
    acc = te.compute((b, d, d, oh, ow), corr, name="corr")
    scale = tirx.const(1.0 / (k * k * c), ACC)
    slope = spec.leaky_slope

    def epilogue(n, q, i, j):
        v = acc[n, q // d, q % d, i, j] * scale
        if slope is not None:
            v = tirx.Select(v > tirx.const(0, ACC), v, v * tirx.const(slope, ACC))
        return v.astype(spec.dtype)

    return te.compute((b, d * d, oh, ow), epilogue, name="out")


def correlation_primfunc(f1_shape, f2_shape=None, *, kernel_size: int, max_displacement: int,
                         stride1: int, stride2: int, pad: int, dtype: str = "float32",
                         leaky_slope: float | None = None):
    """Unscheduled PrimFunc `(f1, f2, out)` of FlowNet correlation (`te.create_prim_func`), with
    the attributes `edgeflow.op = "correlation"`, `edgeflow.params` (its parameters) and
    `op_pattern` = opaque (Relax's FuseOps leaves it alone)."""
    f1_shape = tuple(int(s) for s in f1_shape)
    if f2_shape is not None and tuple(int(s) for s in f2_shape) != f1_shape:
        raise InputError(f"correlation inputs differ in shape: {f1_shape} vs {tuple(f2_shape)}")
    if len(f1_shape) != 4:
        raise InputError(f"correlation inputs must be NCHW, got shape {f1_shape}")
    spec = CorrelationSpec(*f1_shape, kernel_size=kernel_size, max_displacement=max_displacement,
                           stride1=stride1, stride2=stride2, pad=pad, dtype=dtype, leaky_slope=leaky_slope)
    return spec_primfunc(spec)


def spec_primfunc(spec: CorrelationSpec):
    from tvm import te

    shape = (spec.batch, spec.channels, spec.height, spec.width)
    f1 = te.placeholder(shape, spec.dtype, "f1")
    f2 = te.placeholder(shape, spec.dtype, "f2")
    out = correlation_te(f1, f2, spec)
    func = te.create_prim_func([f1, f2, out]).without_attr("global_symbol")
    return func.with_attrs({OP_ATTR: "correlation", PARAMS_ATTR: spec.attrs(), **OPAQUE})


# --------------------------------------------------------------------------------------------
# CUDA plan and schedule


@dataclass(frozen=True)
class CudaPlan:
    """Tiling of the CUDA kernel. A block: tile_h x tile_w output pixels, p_block displacement
    rows, all displacement columns. A thread: p_reg x o_reg x x_reg accumulators."""

    tile_h: int
    tile_w: int
    p_block: int
    p_reg: int
    o_reg: int
    x_reg: int
    chunk: int  # channels per shared-memory stage
    vec: int  # elements per vectorised global load in the cooperative fetch
    threads: int
    blocks: int
    shared_bytes: int
    registers: int  # estimated registers per thread
    blocks_per_sm: int  # resident blocks per SM the plan aims at
    occupancy: float  # resident warps / max warps per SM
    cycles: float  # modelled GPU cycles (relative, for ranking plans)

    def register_budget(self, board) -> int:
        """Registers per thread that still give `blocks_per_sm` resident blocks on `board` (what
        ptxas may use under the kernel's __launch_bounds__(threads, blocks_per_sm))."""
        return next(r for r in range(board.max_registers_per_thread, 0, -1)
                    if board.occupancy(r, self.threads, self.shared_bytes)["blocks_per_sm"] >= self.blocks_per_sm)


def _divisors(n: int, cap: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (cap is None or d <= cap)]


def _window(spec: CorrelationSpec, tile_h: int, tile_w: int, p_block: int) -> tuple[int, int, int, int]:
    """(f1 rows, f1 columns, f2 rows, f2 columns) staged per channel for one block; columns
    rounded out to whole groups for a grouped stage (worst case over the blocks)."""
    k, s1, s2 = spec.kernel_size, spec.stride1, spec.stride2
    rows1, span1 = (tile_h - 1) * s1 + k, (tile_w - 1) * s1 + k
    rows2, span2 = rows1 + (p_block - 1) * s2, span1 + (spec.grid - 1) * s2
    cols = []
    for which, span in ((1, span1), (2, span2)):
        g = spec.stage_group(which)
        first = spec.stage_reach(which)[0]
        starts = [first + j0 * tile_w * s1 for j0 in range(spec.out_hw[1] // tile_w)]
        cols.append(max((x + span - 1) // g - x // g + 1 for x in starts) * g)
    return rows1, cols[0], rows2, cols[1]


def _fetch_vec(spec: CorrelationSpec, which: int, tile_w: int, cols: int) -> int:
    """Widest global load (elements, <= 16 bytes) of stage `which` that stays aligned and within
    one row (or one group of a grouped stage)."""
    g = spec.stage_group(which)
    first = spec.stage_reach(which)[0] - spec.pad  # unpadded column of the first block's window
    limit = 16 // (2 if spec.dtype == "float16" else 4) if spec.kernel_size == 1 else 1
    for v in (8, 4, 2):
        if v > limit or spec.width % v:
            continue
        if g > 1 and g % v == 0 and spec.pad % v == 0:
            return v
        if g == 1 and (tile_w * spec.stride1) % v == 0 and first % v == 0 and cols % v == 0:
            return v
    return 1


def plan_cuda(spec: CorrelationSpec, board=None) -> CudaPlan:
    """The tiling for `spec` on `board` (targets table; see `gpu_board`), chosen by a small
    throughput model: shared-memory wavefronts vs FMA issue per channel, cooperative fetch cost,
    waves over the SMs and latency hiding by resident warps; subject to the block's shared
    memory, thread and register limits and 'no local-memory arrays' (register tiles are fully
    unrolled), with the board's occupancy model."""
    board = gpu_board(board)
    oh, ow = spec.out_hw
    d, ch = spec.grid, spec.channels
    best = None
    for tile_h in _divisors(oh, 16):
        for tile_w in _divisors(ow, 64):
            for p_block in _divisors(d):
                rows1, cols1, rows2, cols2 = _window(spec, tile_h, tile_w, p_block)
                for chunk in _divisors(ch, 32):
                    shared = chunk * (rows1 * cols1 + rows2 * cols2) * 4
                    if shared > board.max_shared_memory_per_block:
                        continue
                    vec = min(_fetch_vec(spec, 1, tile_w, cols1), _fetch_vec(spec, 2, tile_w, cols2))
                    for p_reg in _divisors(p_block, 4):
                        for o_reg in _divisors(d, 8):
                            for x_reg in _divisors(tile_w, 8):
                                cand = _score(spec, board, tile_h, tile_w, p_block, p_reg, o_reg, x_reg,
                                              chunk, vec, shared)
                                if cand is not None and (best is None or cand.cycles < best.cycles):
                                    best = cand
    if best is None:
        raise InternalError(f"no CUDA tiling of correlation {spec} fits {board.name}")
    return best


def _score(spec, board, tile_h, tile_w, p_block, p_reg, o_reg, x_reg, chunk, vec, shared):
    oh, ow = spec.out_hw
    d, k, s1, s2 = spec.grid, spec.kernel_size, spec.stride1, spec.stride2
    ws = board.warp_size
    threads = (p_block // p_reg) * tile_h * (tile_w // x_reg) * (d // o_reg)
    if threads > board.max_threads_per_block or threads < ws:
        return None
    f2_cols = (x_reg - 1) * s1 + 1 + (o_reg - 1) * s2
    acc = p_reg * o_reg * x_reg
    # + indices, pointers, loop state: ptxas needs at most ~30 more than the register tile with
    # the chunk loop rolled (measured on sm_87/72/53 over the family's sizes); an upper bound, as
    # the kernel's launch bounds give ptxas the budget of the occupancy planned from it
    regs = acc + x_reg + p_reg * f2_cols + 32
    if regs > min(board.max_registers_per_thread, 160):
        return None
    regs = -(-regs // 8) * 8
    warps = -(-threads // ws)
    blocks = spec.batch * (d // p_block) * (oh // tile_h) * (ow // tile_w)
    occ = board.occupancy(regs, threads, shared)
    per_sm = occ["blocks_per_sm"]
    if per_sm < 1:
        return None
    # per block: each (channel, ky, kx) step issues p_reg*o_reg*x_reg FMAs and x_reg + p_reg*f2_cols
    # shared loads per warp (f1 loads are broadcasts within the warp)
    fma = warps * acc * ws / board.fp32_lanes_per_sm
    lds = warps * (x_reg + p_reg * f2_cols)
    steps = spec.channels * k * k
    rows1, cols1, rows2, cols2 = _window(spec, tile_h, tile_w, p_block)
    fetch_iters = -(-chunk * (rows1 * cols1 + rows2 * cols2) // (threads * vec))
    fetch = (spec.channels // chunk) * (warps * fetch_iters * 3 + 40)
    store = warps * acc * 2
    per_block = steps * max(fma, lds) + fetch + store
    waves = -(-blocks // (board.sm_count * per_sm))
    active_warps = min(per_sm, -(-blocks // board.sm_count)) * warps
    hiding = min(1.0, active_warps / 16)
    cycles = waves * per_sm * per_block / hiding
    return CudaPlan(tile_h, tile_w, p_block, p_reg, o_reg, x_reg, chunk, vec, threads, blocks, shared,
                    regs, per_sm, occ["occupancy"], cycles)


def _schedule_cuda(func, spec: CorrelationSpec, plan: CudaPlan):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    corr, out = sch.get_sblock("corr"), sch.get_sblock("out")
    d, oh, ow, ch = spec.grid, *spec.out_hw, spec.channels
    sch.transform_block_layout(out, lambda n, q, i, j: (n, q // d, q % d, i, j))
    loops = sch.get_loops(corr)
    n, p, o, i, j, c = loops[:6]
    kernel = list(loops[6:])
    p0, p1, p2 = sch.split(p, [d // plan.p_block, plan.p_block // plan.p_reg, plan.p_reg])
    o1, o2 = sch.split(o, [d // plan.o_reg, plan.o_reg])
    i0, i1 = sch.split(i, [oh // plan.tile_h, plan.tile_h])
    j0, j1, j2 = sch.split(j, [ow // plan.tile_w, plan.tile_w // plan.x_reg, plan.x_reg])
    c0, c1 = sch.split(c, [ch // plan.chunk, plan.chunk])
    sch.reorder(n, p0, i0, j0, p1, i1, j1, o1, c0, c1, *kernel, p2, o2, j2)
    bx = sch.fuse(n, p0, i0, j0)
    tx = sch.fuse(p1, i1, j1, o1)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    # accumulators in registers; scale, activation and cast stored straight from them
    sch.reverse_compute_at(out, tx, preserve_unit_loops=True)
    sch.set_scope(corr, 0, "local")
    # stage both inputs per chunk of channels in shared memory (padding and fp32 cast on the way)
    shared = []
    for idx, stage in ((0, "f1_stage"), (1, "f2_stage")):
        blk = sch.cache_read(corr, idx, "shared")
        sch.compute_at(blk, c0, preserve_unit_loops=True)
        sch.compute_inline(sch.get_sblock(stage))
        g = spec.stage_group(idx + 1)
        if g > 1:  # back to plain columns in shared memory, for the compute's register copies
            sch.transform_layout(blk, ("write", 0), lambda n, ch, y, xg, xi: (n, ch, y, xg * g + xi))
        shared.append(blk)
    # register copies for one (channel, ky, kx) step
    inner = kernel[-1] if kernel else c1
    for idx in (0, 1):
        blk = sch.cache_read(corr, idx, "local")
        sch.compute_at(blk, inner, preserve_unit_loops=True)
        *outer, x = _loops_below(sch, blk, inner)
        for lp in outer:
            sch.unroll(lp)
        v = _register_vec(spec, plan, idx + 1)
        if v > 1:  # vector loads from shared memory (LDS.64/128): alignment shown in _register_vec
            xo, xv = sch.split(x, [None, v])
            sch.unroll(xo)
            sch.vectorize(xv)
        else:
            sch.unroll(x)
    for blk in shared:
        # innermost axis (columns, or the columns of a group) split first: a vector never
        # straddles rows or groups, so the padding test is the same for all its lanes
        *outer, x = _loops_below(sch, blk, c0)
        xo, xv = sch.split(x, [None, plan.vec])
        _, t = sch.split(sch.fuse(*outer, xo), [None, plan.threads])
        sch.bind(t, "threadIdx.x")
        if plan.vec > 1:
            sch.vectorize(xv)
    for lp in (p2, o2, j2):
        sch.unroll(lp)
    # the channels of a chunk one after the other (#pragma unroll 1): NVVM unrolls a short chunk
    # and overlaps the register copies of several channels, up to 45 registers beyond the
    # register tile (20 rolled), more than the plan's estimate allows for
    sch.annotate(c1, "disable_unroll", True)
    sch.decompose_reduction(corr, c0)
    # epilogue: unroll; vector stores along x when the register tile allows
    ol = sch.get_loops(out)[-5:]
    for lp in ol[:-1]:
        sch.unroll(lp)
    lanes = next(v for v in (4, 2, 1) if plan.x_reg % v == 0)  # float4 / half4 stores
    if lanes > 1:
        xo, xv = sch.split(ol[-1], [None, lanes])
        sch.unroll(xo)
        sch.vectorize(xv)
    else:
        sch.unroll(ol[-1])
    # ptxas budgets the registers for the plan's occupancy
    return launch_bounds(_simplify(sch.mod["main"]), plan.blocks_per_sm)


def _simplify(func):
    """`func` with its indices simplified under the blocks' iteration domains. The epilogue reads
    the accumulators at ((p*D + o) // D, (p*D + o) % D) after `transform_block_layout`; left so,
    buffer compaction cannot bound the displacement column of a thread with several displacement
    rows, keeps the whole [p_reg, D, x_reg] accumulator array and indexes it by threadIdx: a
    local-memory array instead of registers."""
    import tvm
    from tvm import s_tir

    return s_tir.transform.StmtSimplify()(tvm.IRModule({"main": func}))["main"]


def _register_vec(spec: CorrelationSpec, plan: CudaPlan, which: int) -> int:
    """Width of the shared-to-register vector loads of input `which`, if every one is aligned.

    A thread's copy of the first input starts at column j1*x_reg of the tile; of the second at
    j1*x_reg + o1*o_reg*s2 (for stride1 = 1, kernel 1). The staged rows start on a multiple of
    the group (or at the tile origin), so both starts are multiples of v when v divides the
    strides below, the row lengths and the copy length."""
    if spec.kernel_size != 1 or spec.stride1 != 1:
        return 1
    _, cols1, _, cols2 = _window(spec, plan.tile_h, plan.tile_w, plan.p_block)
    first = spec.stage_reach(which)[0]
    if which == 1:
        length, steps, cols = plan.x_reg, [plan.x_reg], cols1
    else:
        length = plan.x_reg + (plan.o_reg - 1) * spec.stride2
        steps, cols = [plan.x_reg, plan.o_reg * spec.stride2], cols2
    g = spec.stage_group(which)
    for v in (4, 2):
        origin_ok = first % v == 0 and plan.tile_w % v == 0 if g > 1 else True
        if (origin_ok and length % v == 0 and cols % v == 0 and all(st % v == 0 for st in steps)
                and (g == 1 or g % v == 0)):
            return v
    return 1


def _loops_below(sch, blk, anchor) -> list:
    """The loops of `blk` nested inside the loop `anchor`."""
    loops = sch.get_loops(blk)
    target = sch.get(anchor)
    start = next(idx for idx, lp in enumerate(loops) if sch.get(lp).same_as(target)) + 1
    return loops[start:]


# --------------------------------------------------------------------------------------------
# CPU schedule


def cpu_vector_lanes(target, dtype_bits: int = 32) -> int:
    """fp32 lanes of the widest vector unit the LLVM target has (AVX-512, AVX2, NEON/SSE)."""
    from tvm.target import codegen

    def has(feature):
        try:
            return bool(codegen.llvm_cpu_has_features([feature], target))
        except Exception:  # noqa: BLE001 - a target LLVM cannot query: assume 128-bit
            return False

    bits = 512 if has("avx512f") else 256 if has("avx2") or has("avx") else 128
    return bits // dtype_bits


def _cpu_tile(spec: CorrelationSpec, lanes: int, vregs: int) -> tuple[int, int, int]:
    """(o_reg, x_regs, width): per register tile o_reg displacement columns x x_regs vectors of
    `width` pixels, within the vector register file (4 registers kept for operands)."""
    d, ow = spec.grid, spec.out_hw[1]
    width = next(v for v in (lanes, lanes // 2, lanes // 4, 2, 1) if v >= 1 and ow % v == 0)
    budget = vregs - 4
    x_regs = max(r for r in (4, 3, 2, 1) if ow % (width * r) == 0 and (r == 1 or d * r <= budget))
    o_reg = max(x for x in _divisors(d) if x * x_regs <= budget) if d * x_regs > budget else d
    return o_reg, x_regs, width


def _schedule_cpu(func, spec: CorrelationSpec, target):
    from tvm import s_tir

    lanes = cpu_vector_lanes(target)
    triple = str(target.attrs.get("mtriple", ""))
    vregs = 32 if lanes == 16 or triple.startswith("aarch64") else 16  # AVX-512 and NEON: 32
    d, ow = spec.grid, spec.out_hw[1]
    o_reg, x_regs, width = _cpu_tile(spec, lanes, vregs)
    sch = s_tir.Schedule(func)
    corr, out = sch.get_sblock("corr"), sch.get_sblock("out")
    padded = [w for w in (1, 2) if w == 2 or any(spec.stage_tests(1))]
    if 1 not in padded:  # the first input is read in bounds: read it in place
        sch.compute_inline(sch.get_sblock("f1_stage"))
    sch.transform_block_layout(out, lambda n, q, i, j: (n, q // d, q % d, i, j))
    loops = sch.get_loops(corr)
    n, p, o, i, j, c = loops[:6]
    kernel = list(loops[6:])
    o1, o2 = sch.split(o, [d // o_reg, o_reg])
    j0, jr, jv = sch.split(j, [ow // (width * x_regs), x_regs, width])
    sch.reorder(n, i, p, j0, o1, c, *kernel, o2, jr, jv)
    sch.parallel(sch.fuse(n, i))
    acc = sch.cache_write(corr, 0, "local")
    sch.reverse_compute_at(acc, o1)
    sch.reverse_compute_inline(out)
    sch.unroll(o2)
    sch.unroll(jr)
    if width > 1:
        sch.vectorize(jv)
        sch.vectorize(sch.get_loops(acc)[-1])
    sch.decompose_reduction(corr, c)
    # padded fp32 copies of the inputs that need them: once, rows in parallel, by groups
    for which in padded:
        st = sch.get_sblock(f"f{which}_stage")
        g = spec.stage_group(which)
        if g > 1:
            sch.transform_layout(st, ("write", 0), lambda n, ch, y, xg, xi: (n, ch, y, xg * g + xi))
        sl = sch.get_loops(st)
        sch.parallel(sch.fuse(sl[0], sl[1], sl[2]))
        if g > 1:
            sch.vectorize(sl[-1])
    return sch.mod["main"]


# --------------------------------------------------------------------------------------------
# public entry points


def schedule_correlation(func, target, board=None, plan: CudaPlan | None = None):
    """The hand-scheduled form of `func` (from `correlation_primfunc`) for a CUDA or LLVM
    `target` (CUDA: tiles from `plan`, else planned for `board` of the targets table, see
    `gpu_board`), with `tirx.is_scheduled` set so that dlight leaves it alone."""
    import tvm

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    spec = CorrelationSpec.of(func)
    if is_cuda(target):
        plan = plan or plan_cuda(spec, gpu_board(board, target))
        sched = _schedule_cuda(func, spec, plan)
        extra = {"edgeflow.plan": {k: v for k, v in asdict(plan).items() if k != "cycles"}}
    elif str(target.kind.name) == "llvm":
        sched = _schedule_cpu(func, spec, target)
        extra = {}
    else:
        raise InternalError(f"no correlation schedule for target kind {target.kind.name}")
    attrs = {OP_ATTR: "correlation", PARAMS_ATTR: func.attrs[PARAMS_ATTR], "tirx.is_scheduled": True,
             "tir.is_scheduled": True, **extra}
    return sched.with_attrs(attrs)


def emit_correlation(bb, f1, f2, *, kernel_size: int = 1, max_displacement: int = 20, stride1: int = 1,
                     stride2: int = 2, pad: int = 20, leaky_slope: float | None = None):
    """Emit `call_tir` of the unscheduled correlation PrimFunc into Relax BlockBuilder `bb`."""
    from tvm import relax

    shape = [int(s) for s in f1.ty.shape.values]
    dtype = str(f1.ty.dtype)
    spec = CorrelationSpec(*shape, kernel_size=kernel_size, max_displacement=max_displacement,
                           stride1=stride1, stride2=stride2, pad=pad, dtype=dtype, leaky_slope=leaky_slope)
    gv = bb.add_func(spec_primfunc(spec), "correlation")
    return bb.emit(relax.call_tir(gv, [f1, f2], relax.TensorType(list(spec.out_shape), dtype)))


_ARGS = ("f1", "f2", "kernel_size", "max_displacement", "stride1", "stride2", "pad")


def convert_correlation(node, importer):
    """custom_convert_map entry for `edgeflow::correlation`: (fx node, importer) -> relax var.

    A LeakyReLU that is the correlation's only user is fused into it (`leaky_slope`); the
    `leaky_relu.default` entry of CUSTOM_CONVERT_MAP then passes that value through."""
    args = node_args(node, _ARGS)
    env = importer.env
    slope = _sole_leaky_relu(node)
    out = emit_correlation(importer.block_builder, env[args.pop("f1")], env[args.pop("f2")],
                           leaky_slope=slope, **{k: int(v) for k, v in args.items()})
    if slope is not None:
        fused = getattr(importer, FUSED_ATTR, None)
        if fused is None:
            fused = set()
            setattr(importer, FUSED_ATTR, fused)
        fused.add(node)
    return out


FUSED_ATTR = "_edgeflow_fused_activation"


def _sole_leaky_relu(node) -> float | None:
    users = list(node.users)
    if len(users) != 1 or getattr(users[0].target, "__name__", "") != "leaky_relu.default":
        return None
    user = users[0]
    slope = user.args[1] if len(user.args) > 1 else user.kwargs.get("negative_slope", 0.01)
    return float(slope)


def convert_leaky_relu(node, importer):
    """custom_convert_map entry for `aten.leaky_relu`: the identity after a correlation that
    took it in, else the importer's own conversion."""
    if node.args[0] in getattr(importer, FUSED_ATTR, ()):
        return importer.env[node.args[0]]
    return importer._leakyrelu(node)  # noqa: SLF001 - the importer's own converter


def cuda_report(spec: CorrelationSpec, board, *, ptxas: bool = True) -> dict:
    """Static report of the CUDA kernel for `spec` on a targets-table `board`: the plan, FLOPs,
    bytes, shared memory, registers and spills (ptxas when a toolchain for the arch is here,
    else the plan's estimate), and the board's own model of it (`Board.occupancy`,
    `Board.roofline_seconds`, as `edgeflow inspect` uses; the arithmetic is fp32 whatever the
    input dtype)."""
    import tvm

    from edgeflow.compile.ops import verify

    plan = plan_cuda(spec, board)
    esize = 2 if spec.dtype == "float16" else 4
    b, c, h, w = spec.batch, spec.channels, spec.height, spec.width
    dram = (2 * b * c * h * w + math.prod(spec.out_shape)) * esize
    rows1, cols1, rows2, cols2 = _window(spec, plan.tile_h, plan.tile_w, plan.p_block)
    fetched = plan.blocks * c * (rows1 * cols1 + rows2 * cols2) * esize
    report = {"board": board.name, "arch": board.cuda_arch, "dtype": spec.dtype,
              "plan": {k: v for k, v in asdict(plan).items() if k != "cycles"},
              "flops": spec.flops, "dram_bytes": dram, "global_load_bytes": fetched,
              "shared_bytes": plan.shared_bytes, "threads": plan.threads, "blocks": plan.blocks,
              "registers": plan.registers, "registers_source": "estimate", "spill_bytes": None}
    tool = verify.ptxas_tool(board.cuda_arch, board.cuda_version) if ptxas else None
    if tool is not None:
        target = tvm.target.Target({"kind": "cuda", "arch": board.cuda_arch})
        func = schedule_correlation(spec_primfunc(spec), target, board, plan=plan)
        res = verify.ptxas_resources(verify.cuda_source(func, target), board.cuda_arch, board.cuda_version)[0]
        report.update(registers=res.registers, registers_source=f"ptxas ({tool})",
                      spill_bytes=res.spill_stores + res.spill_loads, shared_bytes=res.shared_bytes)
    occ = board.occupancy(report["registers"], plan.threads, report["shared_bytes"])
    seconds, bound = board.roofline_seconds(spec.flops, dram)
    report.update(occupancy=occ["occupancy"], blocks_per_sm=occ["blocks_per_sm"],
                  occupancy_limited_by=occ["limited_by"], arithmetic_intensity=round(spec.flops / dram, 2),
                  roofline_ms=round(seconds * 1e3, 4), bound=bound)
    return report
