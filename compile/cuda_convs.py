"""Convolutions for tensor cores on CUDA: deconvolutions split by output phase, fp16 casts before
concatenations, a tensor-core schedule for the fp16 convolutions that dlight leaves on FMA, and a
thread-per-pixel schedule for the 2-channel flow heads.

`split_deconvolutions(mod)` (a Relax rewrite, run by `lower.prepare` for CUDA boards before mixed
precision, so the weight transform is lifted out of `main` and done at compile time):
`conv2d_transpose` with stride s, kernel k a multiple of s, output a multiple of s (FlowNet's 4x4
stride-2 deconvolutions) becomes one dense convolution with (k/s)^2 taps and s^2 x OC output
channels, one block of OC per output phase, over the input padded so that every phase reads the
same window, followed by slices and an interleave (depth-to-space) that FuseOps fuses with the
bias, the activation and the decoder's concatenation into one injective kernel. The work is the
deconvolution's exact work (plus one row and column of the padded border), instead of TOPI's
convolution over a zero-dilated input (s^2 = 4 times the work), and the GEMM has s^2 x OC columns,
enough for dlight's tensor-core rule.

With y + pad = s*q + r (r the tap phase of output phase py), out[s*yh + py] = sum over t < k/s of
x[yh + c - t] * w[s*t + r], c = (py + pad) // s. Over the input padded by lo = k/s - 1 - min(c)
rows on top, a stride-1 convolution with taps a = k/s - 1 - t reads exactly that window at
output row yh + c - min(c).

`TensorCoreConv` (a dlight GPU rule, before dlight's own `Matmul` in `lower.build`): dlight's
`Matmul` tensorizes a GEMM-like fp16 PrimFunc only when every GEMM extent exceeds 64
(`minimal_tensorize_threshold`), and its tensor-core schedule (`MatmulTensorization`) pads the
output channels to 128. So FlowNet's narrow layers (conv1: 24 channels, conv2: 48 at 3/8 width)
ran on FMA. This rule is dlight's `MatmulTensorization` (WMMA 16x16x16, fp32 accumulation,
shared-memory pipelining) with the column tile sized to the channel count (a multiple of 16:
24 -> 32, 48 -> 48), for fp16 convolutions with 16 or more output channels that dlight would
leave on FMA. Fewer channels (the 2-channel flow predictors, the 4 x 2 phases of the flow
upsamplers), where a 16-wide tensor-core tile would be mostly padding, go to `NarrowConv` (FMA,
one thread per output pixel, no padding) instead of dlight's `Matmul`, which pads them to 64
columns.

`cast_before_concat(mod)` (Relax, after mixed precision, CUDA fp16): see its docstring.

flownet2-s fp16 at 448x1024 for the Orin Nano: 36.5 GFLOP -> 15.7 GFLOP per inference, tensor
cores (HMMA in the SASS) in 14 of 23 convolution kernels with 99 % of their FLOPs (10 with 33 %
before), 35 -> 31 kernels, 134 -> 104 MB moved.
"""

from __future__ import annotations

from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

DLIGHT_THRESHOLD = 64  # dlight Matmul: tensor cores only when every GEMM extent exceeds this
MIN_CHANNELS = 16  # fewer output channels: FMA (one 16-wide tile would be mostly padding)


# --------------------------------------------------------------------------------------------
# deconvolution -> phase convolution (Relax)


def phase_plan(size_in: int, size_out: int, kernel: int, stride: int, pad: int):
    """One spatial dimension of the split: (taps per phase, [tap indices per output phase],
    [row offset of each phase in the convolution's output], (pad before, pad after)), or None
    when the split does not apply (kernel or output not a multiple of the stride)."""
    if kernel % stride or size_out % stride:
        return None
    taps = kernel // stride
    c = [(p + pad) // stride for p in range(stride)]
    r = [(p + pad) % stride for p in range(stride)]
    lo = taps - 1 - min(c)
    conv_out = size_out // stride + max(c) - min(c)
    hi = conv_out + taps - 1 - size_in - lo
    if lo < 0 or hi < 0:
        return None
    index = [[stride * (taps - 1 - a) + r[p] for a in range(taps)] for p in range(stride)]
    return taps, index, [x - min(c) for x in c], (lo, hi)


def _deconv_as_phases(bb, call):
    """The Relax expression replacing the conv2d_transpose `call`, or None (left as it is)."""
    import numpy as np
    from tvm import relax

    a = call.attrs
    data, weight = call.args
    try:
        n, ci, h, w = (int(v) for v in data.ty.shape)
        _, co, kh, kw = (int(v) for v in weight.ty.shape)
        oh, ow = (int(v) for v in list(call.ty.shape)[2:])
    except (TypeError, ValueError, AttributeError):  # symbolic shapes
        return None
    if (a.data_layout != "NCHW" or a.kernel_layout != "IOHW" or a.out_layout != "NCHW" or int(a.groups) != 1
            or any(int(d) != 1 for d in a.dilation)):
        return None
    (sh, sw), (pt, pl) = (int(s) for s in a.strides), (int(p) for p in a.padding[:2])
    py_plan, px_plan = phase_plan(h, oh, kh, sh, pt), phase_plan(w, ow, kw, sw, pl)
    if py_plan is None or px_plan is None:
        return None
    (th, iy, dy, (top, bottom)), (tw, ix, dx, (left, right)) = py_plan, px_plan
    op = relax.op
    blocks = []  # [IC, OC, th, tw] per phase, phase-major
    # The indices are in range by construction; "clip" costs nothing (this weight transform runs once,
    # at compile time) and, unlike the default "fast", makes TVM print no warning for each take.
    for py in range(sh):
        rows = op.take(weight, relax.const(np.array(iy[py], "int64")), axis=2, mode="clip")
        for px in range(sw):
            blocks.append(op.take(rows, relax.const(np.array(ix[px], "int64")), axis=3, mode="clip"))
    kernel = op.permute_dims(op.concat(blocks, axis=1), [1, 0, 2, 3])  # [s*s*OC, IC, th, tw]
    out_dtype = a.out_dtype
    conv = bb.emit(op.nn.conv2d(data, kernel, padding=(top, left, bottom, right), out_dtype=out_dtype))
    qh, qw = oh // sh, ow // sw
    rows = []
    for py in range(sh):
        cols = []
        for px in range(sw):
            c0 = (py * sw + px) * co
            cols.append(op.strided_slice(conv, axes=[1, 2, 3], begin=[c0, dy[py], dx[px]],
                                         end=[c0 + co, dy[py] + qh, dx[px] + qw]))
        rows.append(op.stack(cols, axis=4))  # [N, OC, qh, qw, sw]
    return op.reshape(op.stack(rows, axis=3), [n, co, oh, ow])  # [N, OC, qh, sh, qw, sw]


def _rewrite_functions(mod, mutator_class):
    """`mod` with every Relax function rewritten by a fresh `mutator_class(module so far)`, unused
    bindings removed."""
    from tvm import relax

    out = mod
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator = mutator_class(out)
            new_func = mutator.visit_expr(func)
            out = mutator.builder_.get()
            out[gv] = relax.analysis.remove_all_unused(new_func)
    return out


def split_deconvolutions(mod):
    """`mod` with every splittable `conv2d_transpose` of its Relax functions replaced by a
    phase convolution and an interleave (see the module docstring); the rest untouched."""
    import tvm
    from tvm import relax

    target_op = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    @relax.expr_functor.mutator
    class Split(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(target_op):
                new = _deconv_as_phases(self.builder_, call)
                if new is not None:
                    return new
            return call

    return _rewrite_functions(mod, Split)


def cast_before_concat(mod):
    """`astype(concat(xs), fp16)` of fp32 tensors becomes `concat([astype(x, fp16) for x in xs])`
    (the same values), and identical casts are merged. After mixed precision the decoder's skip
    connections leave their convolution in fp32, are cast to fp16 by a kernel of their own for
    the next convolution, and are read again in fp32 by the concatenation, which is cast after:
    with the casts first, every convolution writes fp16 once (its cast fused into it) and the
    concatenation moves half the bytes."""
    import tvm
    from tvm import relax

    concat_op, cast_op = tvm.ir.Op.get("relax.concat"), tvm.ir.Op.get("relax.astype")

    @relax.expr_functor.mutator
    class Hoist(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (call.op.same_as(cast_op) and str(call.attrs.dtype) == "float16"
                    and isinstance(call.args[0], relax.Var)):
                return call
            cat = self.lookup_binding(call.args[0])
            if not (isinstance(cat, relax.Call) and cat.op.same_as(concat_op)
                    and isinstance(cat.args[0], relax.Tuple)):
                return call
            fields = [self.builder_.emit(relax.op.astype(x, "float16")) for x in cat.args[0].fields]
            return relax.op.concat(fields, axis=int(cat.attrs.axis))

    out = _rewrite_functions(mod, Hoist)
    return relax.transform.CanonicalizeBindings()(relax.transform.EliminateCommonSubexpr()(out))


# --------------------------------------------------------------------------------------------
# tensor-core schedule for narrow fp16 convolutions (dlight rule)


def gemm_extents(sch, block) -> tuple[int, int, int] | None:
    """(I, J, K) of a GEMM-like block after dlight's normalisation C[I, J] += A[I, K] * B[J, K]
    (I: output pixels, J: output channels, K: input channels x taps), None if not GEMM-like or
    not static."""
    from tvm.s_tir.dlight.gpu.matmul import IterKind, detect_iter_traits

    traits = detect_iter_traits(sch.get(block))
    if traits is None:
        return None
    sizes = {IterKind.kIter_I: 1, IterKind.kIter_J: 1, IterKind.kIter_K: 1, IterKind.kIter_S: 1}
    for t in traits[3]:
        if t.kind in sizes:
            try:
                sizes[t.kind] *= int(t.extent)
            except TypeError:
                return None
    if sizes[IterKind.kIter_S] != 1:
        return None
    return sizes[IterKind.kIter_I], sizes[IterKind.kIter_J], sizes[IterKind.kIter_K]


def column_tile(channels: int) -> tuple[int, int]:
    """(warps along J, 16x16 fragments per warp along J) covering `channels` output channels
    with the least padding: a tile of 16 x warps x fragments columns."""
    frags = -(-channels // 16)
    if frags <= 4:
        return frags, 1
    return 4, min(2, -(-frags // 4))


class TensorCoreConv(GPUScheduleRule):
    """fp16 GEMM-like PrimFuncs (convolutions, with their fused epilogue) that dlight's `Matmul`
    would leave on FMA (an extent <= 64) and that have at least MIN_CHANNELS output channels:
    dlight's WMMA schedule with the column tile fitted to the channels."""

    def apply(self, func, target, _tunable):  # noqa: C901 - one schedule, step by step
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import get_root_block
        from tvm.s_tir.dlight.gpu.matmul import (auto_inline_consumer_chain, auto_inline_producers,
                                                 get_in_out_dtypes, get_index_map, get_reduction_blocks)
        from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if target.kind.name != "cuda" or int(str(target.attrs.get("arch", "sm_0")).split("_")[1]) < 70:
            return None
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if blocks is None:
            return None
        main = blocks[0]
        if get_in_out_dtypes(sch.get(main))[0] != "float16" or get_index_map(sch.get(main)) is None:
            return None
        extents = gemm_extents(sch, main)
        if extents is None:
            return None
        i_ext, j_ext, k_ext = extents
        if j_ext < MIN_CHANNELS or min(extents) > DLIGHT_THRESHOLD:
            return None  # too narrow for tensor cores, or dlight's Matmul tensorizes it itself
        warps_j, frags_j = column_tile(j_ext)
        warps_i, frags_i = 4, 2
        i_factors, j_factors, k_factors = [None, 1, warps_i, frags_i], [1, None, warps_j, frags_j], [None, 4]
        num_ty, warp_size, vector_size = warps_i * warps_j, 32, 4

        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), b_map)
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        sch.pad_einsum(main, [1, 16 * warps_i * frags_i, 16 * warps_j * frags_j, 16 * k_factors[1]])

        batch, i, j, k = sch.get_loops(main)
        i, i_inner = sch.split(i, factors=[None, 16])
        j, j_inner = sch.split(j, factors=[None, 16])
        k, k_inner = sch.split(k, factors=[None, 16])
        sch.reorder(i, j, k, i_inner, j_inner, k_inner)
        block_inner = main
        block_outer = sch.blockize(i_inner)
        i0, i1, i2, i3 = sch.split(i, factors=i_factors)
        j0, j1, j2, j3 = sch.split(j, factors=j_factors)
        k0, k1 = sch.split(k, k_factors)
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
        sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
        sch.bind(batch, "blockIdx.z")
        sch.bind(sch.fuse(i0, j0), "blockIdx.x")
        sch.bind(sch.fuse(i1, j1), "blockIdx.y")
        thread_idy = sch.fuse(j2, i2)
        sch.bind(thread_idy, "threadIdx.y")

        def fetch_to_shared(block, idx):
            read = sch.cache_read(block, idx, "shared.dyn")
            sch.compute_at(read, k0)
            fused = sch.fuse(*sch.get_loops(read)[-2:])
            _, f1, f2, f3 = sch.split(fused, factors=[None, num_ty, warp_size, vector_size])
            sch.bind(f2, "threadIdx.x")
            sch.bind(f1, "threadIdx.y")
            sch.vectorize(f3)
            sch.storage_align(read, 0, axis=-2, factor=16, offset=8)
            sch.annotate(read, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(read, "double_buffer_scope", 0)
            return read

        auto_inline_producers(sch, fetch_to_shared(block_outer, 0))
        auto_inline_producers(sch, fetch_to_shared(block_outer, 1))
        a_mat = sch.cache_read(block_outer, 0, "wmma.matrix_a")
        b_mat = sch.cache_read(block_outer, 1, "wmma.matrix_b")
        sch.compute_at(a_mat, k1)
        sch.compute_at(b_mat, k1)
        # a narrow accumulator tile is staged in static shared memory: in the dynamic pool, TVM's
        # storage rewrite lets it reuse a larger fp16 operand buffer and lowering then fails (dtype
        # check). A full 128-column tile (64 kB) stays in the dynamic pool, as dlight has it: static,
        # it would add 64 kB to the 72 kB pool, beyond Volta's 96 kB per block.
        stage = "shared" if 16 * warps_j * frags_j < 128 else "shared.dyn"
        to_global = sch.cache_write(block_outer, 0, stage)
        sch.storage_align(to_global, 0, -2, 16, 4)
        store = sch.cache_write(block_outer, 0, "wmma.accumulator")
        sch.reverse_compute_at(store, thread_idy)
        sch.reverse_compute_at(to_global, thread_idy)
        si, sj = sch.get_loops(store)[-2:]
        si0, si1 = sch.split(si, factors=[None, 16])
        sj0, sj1 = sch.split(sj, factors=[None, 16])
        sch.reorder(si0, sj0, si1, sj1)
        init = sch.get_child_blocks(sch.decompose_reduction(block_outer, k0))[0]

        intrin = get_wmma_intrin_group(load_scope="shared.dyn", store_scope=stage, in_dtype="float16",
                                       out_dtype="float32", trans_b=True)
        try:
            for mat, name in ((a_mat, "load_a"), (b_mat, "load_b")):
                mi, mj = sch.get_loops(mat)[-2:]
                mi0, mi1 = sch.split(mi, factors=[None, 16])
                mj0, mj1 = sch.split(mj, factors=[None, 16])
                sch.reorder(mi0, mj0, mi1, mj1)
                sch.unroll(mi0)
                sch.unroll(mj0)
                sch.tensorize(mi1, intrin[name])
            sch.tensorize(sch.get_loops(init)[-2], intrin["init"])
            sch.tensorize(sch.get_loops(store)[-2], intrin["store"])
            sch.tensorize(sch.get_loops(block_inner)[-3], intrin["compute"])
        except Exception:  # noqa: BLE001 - TVM refuses to tensorize: the rule does not apply
            return None
        auto_inline_consumer_chain(sch, to_global)
        fused = sch.fuse(*sch.get_loops(to_global)[-2:])
        _, f1, f2 = sch.split(fused, factors=[None, warp_size, vector_size])
        sch.bind(f1, "threadIdx.x")
        sch.vectorize(f2)
        return sch


class NarrowConv(GPUScheduleRule):
    """GEMM-like PrimFuncs (convolutions with their epilogue) with fewer than MIN_CHANNELS output
    channels: the flow predictors (2 channels) and the phase convolutions of the flow upsamplers
    (4 phases x 2). One thread per output pixel keeps all its channels in registers while the
    input channels and taps stream by: neighbouring threads read neighbouring pixels (coalesced),
    and every thread of a warp reads the same weight (a broadcast). dlight's `Matmul` pads such a
    GEMM to 64 or more columns: 30x the work for 2 channels."""

    THREADS = 128

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import get_root_block
        from tvm.s_tir.dlight.gpu.matmul import IterKind, detect_iter_traits, get_reduction_blocks

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reduction = get_reduction_blocks(sch, blocks)
        if reduction is None:
            return None
        main = reduction[0]
        extents = gemm_extents(sch, main)
        if extents is None or extents[1] >= MIN_CHANNELS:
            return None
        position = [sch.get(b).name_hint for b in blocks].index(sch.get(main).name_hint)
        try:
            for b in blocks[:position]:  # padding and other producers: read in place
                sch.compute_inline(b)
            epilogue = blocks[position + 1:]
            for b in epilogue[:-1]:
                sch.compute_inline(b)
            traits = detect_iter_traits(sch.get(main))[3]
            loops = sch.get_loops(main)
            kinds = [t.kind for t in traits]
            rows = [lp for lp, k in zip(loops, kinds) if k in (IterKind.kIter_I, IterKind.kIter_T)]
            cols = [lp for lp, k in zip(loops, kinds) if k == IterKind.kIter_J]
            red = [lp for lp, k in zip(loops, kinds) if k == IterKind.kIter_K]
            sch.reorder(*rows, *red, *cols)
            bx, tx = sch.split(sch.fuse(*rows), [None, self.THREADS])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            acc = sch.cache_write(main, 0, "local")
            sch.reverse_compute_at(acc, tx)
            if epilogue:
                sch.reverse_compute_inline(epilogue[-1])
            for lp in cols:
                sch.unroll(lp)
            sch.unroll(red[-1])
            sch.decompose_reduction(main, red[0])
        except Exception:  # noqa: BLE001 - a shape this schedule does not cover: dlight's rules
            return None
        return sch
