"""Per-kernel statistics of a CUDA build, read from the device IRModule that TVM hands to its CUDA
codegen (`target.build.cuda`, wrapped in `lower`):

- launch dimensions: grid and block sizes from the kernels' `thread_extent` attributes;
- FLOPs: the floating-point arithmetic the lowered kernel executes (add, sub, mul, div, min,
  max, comparisons, fma = 2, math intrinsics = 1; vectors count their lanes; a warp's tensor-core
  multiply-accumulate, WMMA m x n x k or PTX mma.mNnNkN, 2mnk), times the trip counts of the
  loops around it and the launch size. Padding work the schedule does counts; `if` statements
  count their larger branch. fp16 arithmetic (and fp16 tensor-core work) is counted apart
  (`flops_fp16`), for the roofline's fp16 peak;
- bytes: the sizes of the global buffers the kernel reads plus those it writes, each once
  (the compulsory DRAM traffic of the roofline model; caches and re-reads are not modelled);
- and, from the Relax module the build started from (`merge`): launches per inference (layers of
  the same shape share one PrimFunc) and the `edgeflow.op` of our hand-written operators.

The results are plain dicts stored in the package manifest, so that `edgeflow inspect` needs no
compiler. Needs TVM.
"""

from __future__ import annotations

import math
import re

# Math intrinsics that count as one floating-point operation (fma counts two).
_MATH = {"exp", "exp2", "exp10", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "pow",
         "erf", "floor", "ceil", "round", "nearbyint", "trunc", "fabs", "sin", "cos", "atan", "fmod"}
_WARP = 32
_BLOCK_TAGS, _THREAD_TAGS = ("blockIdx.x", "blockIdx.y", "blockIdx.z"), ("threadIdx.x", "threadIdx.y", "threadIdx.z")


def collect(device_mod) -> dict[str, dict]:
    """{kernel name: stats} for every device function of `device_mod` (see `kernel_stats`)."""
    out = {}
    for gv, func in device_mod.functions.items():
        symbol = func.attrs.get("global_symbol", gv.name_hint) if func.attrs is not None else gv.name_hint
        out[str(symbol)] = kernel_stats(func)
    return out


def kernel_stats(func) -> dict:
    """Launch dimensions, FLOPs and bytes of one lowered device PrimFunc:
    {"grid": [x, y, z], "block": [x, y, z], "threads_per_block", "blocks", "flops",
    "flops_fp16", "bytes_read", "bytes_written", "bytes"}."""
    launch: dict[str, int] = {}
    flops = _count(func.body, 1, launch, _wmma(func))
    read, written = _global_traffic(func)
    grid = [launch.get(t, 1) for t in _BLOCK_TAGS]
    block = [launch.get(t, 1) for t in _THREAD_TAGS]
    return {"grid": grid, "block": block, "threads_per_block": math.prod(block), "blocks": math.prod(grid),
            "flops": int(flops[0] + flops[1]), "flops_fp16": int(flops[1]),
            "bytes_read": read, "bytes_written": written, "bytes": read + written}


def merge(resources, stats: dict[str, dict], mod=None) -> list[dict]:
    """The manifest's "kernels" list: ptxas `resources` (KernelResources) completed with their
    `stats`, "launches" (calls per inference of the PrimFunc the kernel comes from, counted in
    the Relax functions of `mod`: identical layers share one PrimFunc) and "op" (for kernels of
    our hand-written operators, the PrimFunc's `edgeflow.op`, else None)."""
    ops, calls = (hand_ops(mod), call_counts(mod)) if mod is not None else ({}, {})
    out = []
    for r in resources:
        func = re.sub(r"_kernel(_\d+)?$", "", r.name)
        out.append({**r.__dict__, **stats.get(r.name, {}), "launches": calls.get(func, 1), "op": ops.get(func)})
    return out


def hand_ops(mod) -> dict[str, str]:
    """{PrimFunc name: edgeflow.op} of the functions of `mod` that carry our operators."""
    from edgeflow.compile.ops import OP_ATTR

    out = {}
    for gv, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and OP_ATTR in attrs:
            out[gv.name_hint] = str(attrs[OP_ATTR])
    return out


def call_counts(mod) -> dict[str, int]:
    """{function name: references} in the Relax functions of `mod` (a PrimFunc is referenced
    once per call_tir)."""
    import tvm_ffi
    from tvm import ir, relax

    counts: dict[str, int] = {}

    def seen(gv):
        counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            tvm_ffi.structural_walk(func.body, [(ir.GlobalVar, seen)])
    return counts


def _int(expr) -> int | None:
    try:
        return int(expr)
    except (TypeError, ValueError):
        return None


def _dtype(expr):
    """The dtype of a scalar or vector expression; None for pointers and other types."""
    return getattr(expr.ty, "dtype", None)


def _is_float(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _add(acc: list, dtype, count: int) -> None:
    """Add `count` operations of `dtype` (a scalar or vector DataType) to acc = [fp32, fp16]."""
    lanes = getattr(dtype, "lanes", 1) or 1
    acc[1 if str(dtype).startswith(("float16", "bfloat16")) else 0] += count * lanes


def _count(stmt, mult: int, launch: dict, wmma: tuple) -> list:
    """[fp32-and-other FLOPs, fp16 FLOPs] executed by `stmt` when run `mult` times; records the
    thread extents met in `launch`. wmma: (FLOPs of one warp's tvm_mma_sync, operand dtype)."""
    import tvm_ffi
    from tvm import ir, tirx

    acc = [0, 0]
    skip = tvm_ffi.WalkResult.SKIP

    def on_for(loop):
        ext = _int(loop.extent)
        _merge(acc, _count(loop.body, mult * (ext if ext is not None else 1), launch, wmma))
        return skip

    def on_attr(attr):
        if attr.attr_key not in ("thread_extent", "virtual_thread"):
            return None
        ext = _int(attr.value) or 1
        tag = getattr(attr.node, "thread_tag", "")
        if attr.attr_key == "thread_extent" and tag:
            launch[tag] = max(launch.get(tag, 1), ext)
        _merge(acc, _count(attr.body, mult * ext, launch, wmma))
        return skip

    def on_if(node):
        then = _count(node.then_case, mult, launch, wmma)
        other = _count(node.else_case, mult, launch, wmma) if node.else_case is not None else [0, 0]
        _merge(acc, max(then, other, key=sum))
        return skip

    def on_arith(e):
        dt = _dtype(e)
        if _is_float(dt):
            _add(acc, dt, mult)

    def on_compare(e):
        dt = _dtype(e.a)
        if _is_float(dt):
            _add(acc, dt, mult)

    def on_call(e):
        name = str(getattr(e.op, "name", "")).split(".")[-1]
        dt = _dtype(e)
        if _is_float(dt) and (name == "fma" or name in _MATH):
            _add(acc, dt, 2 * mult if name == "fma" else mult)
        elif name in ("tvm_mma_sync", "tvm_bmma_sync"):  # one per thread of the warp
            _add(acc, wmma[1], mult * wmma[0] // _WARP)
        elif name in ("ptx_mma", "ptx_mma_sp"):
            shape, a_dtype = str(e.args[1].value), str(e.args[4].value)
            m, n, k = (int(v) for v in re.findall(r"\d+", shape)[:3])
            _add(acc, "float16" if a_dtype in ("fp16", "bf16") else "float32", mult * 2 * m * n * k // _WARP)

    arith = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Min, tirx.Max)
    compare = (tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.EQ, tirx.NE)
    tvm_ffi.structural_walk(stmt, [(tirx.For, on_for), (tirx.AttrStmt, on_attr), (tirx.IfThenElse, on_if),
                                   (arith, on_arith), (compare, on_compare), (ir.Call, on_call)], order="pre")
    return acc


def _wmma(func) -> tuple[int, str]:
    """(FLOPs of one warp-wide tvm_mma_sync, dtype of its operands) from the function's WMMA
    fragments (their "fragment_shape" m, n, k and the dtype of the matrix_a fragment)."""
    import tvm_ffi
    from tvm import tirx

    found = {"shape": (16, 16, 16), "dtype": "float16"}

    def on_attr(attr):
        if attr.attr_key == "fragment_shape":
            found["shape"] = tuple(int(v) for v in str(attr.value.value).split(","))

    def on_alloc(node):
        if node.buffer.scope() == "wmma.matrix_a":
            found["dtype"] = str(node.buffer.dtype)

    tvm_ffi.structural_walk(func.body, [(tirx.AttrStmt, on_attr), (tirx.AllocBuffer, on_alloc)])
    m, n, k = found["shape"]
    return 2 * m * n * k, found["dtype"]


def _merge(acc: list, other: list) -> None:
    acc[0] += other[0]
    acc[1] += other[1]


def _global_traffic(func) -> tuple[int, int]:
    """(bytes read, bytes written): sizes of the parameter buffers the kernel loads from and
    stores to (a device function declares a buffer on each pointer parameter it accesses)."""
    import tvm_ffi
    from tvm import ir, tirx

    params = list(func.params)
    decls = []  # (buffer var, bytes) of the buffers declared on the parameters

    def on_decl(node):
        if any(node.data.same_as(p) for p in params):
            buf, dt = node.buffer, node.buffer.dtype
            shape = [_int(s) for s in buf.shape]
            nbytes = math.prod(shape) * max(1, dt.bits * (dt.lanes or 1) // 8) if None not in shape else 0
            decls.append((buf, nbytes))

    tvm_ffi.structural_walk(func.body, [(tirx.DeclBuffer, on_decl)])
    read, written = set(), set()

    def mark(into, buf):
        into.update(i for i, (b, _) in enumerate(decls) if b.same_as(buf))

    tvm_ffi.structural_walk(func.body, [(ir.expr.TensorLoad, lambda n: mark(read, n.source)),
                                        (tirx.BufferStore, lambda n: mark(written, n.buffer))])
    return sum(decls[i][1] for i in read), sum(decls[i][1] for i in written)
