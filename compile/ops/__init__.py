"""FlowNet2's custom operators (correlation, warp) as TIR, with hand schedules for CUDA and CPUs.

The frontend maps the torch custom ops `edgeflow::correlation` and `edgeflow::warp` to
`call_tir`s of unscheduled PrimFuncs (`CUSTOM_CONVERT_MAP`, for
`from_exported_program(..., custom_convert_map=...)`). Those PrimFuncs carry the attribute
`edgeflow.op`; `apply_hand_schedules` later swaps each for its hand-scheduled form for the
target, marked `tirx.is_scheduled` so that dlight leaves it alone.

CUDA schedules size their tiles from a board of the targets table (`edgeflow.targets.Board`:
shared memory, threads, registers, occupancy model), the one place board knowledge lives.
`to_fp16` runs the operators of a mixed-precision module in fp16. Importing this package does
not import TVM.
"""

from __future__ import annotations

from edgeflow.errors import InternalError

OP_ATTR = "edgeflow.op"
PARAMS_ATTR = "edgeflow.params"
# Relax's FuseOps must not merge our functions into their neighbours (FuseTIR would drop the
# attributes that find them, and the hand schedules cover one op): pattern kOpaque.
OPAQUE = {"op_pattern": 8}


def gpu_board(board=None, target=None):
    """The targets-table `Board` whose limits (shared memory, threads, registers, SMs; the
    `_gpu_archs` entry of its CUDA arch) a CUDA schedule follows: `board` itself when given,
    else the first board of the table with `target`'s CUDA arch, else the default board."""
    from edgeflow import targets

    if board is not None:
        return board
    arch = str(target.attrs.get("arch", "")) if hasattr(target, "attrs") else None
    return next((b for b in targets.BOARDS.values() if b.is_cuda and b.cuda_arch == arch),
                targets.get(targets.DEFAULT))


def launch_bounds(func, blocks_per_sm: int):
    """Scheduled `func` with __launch_bounds__(threads, blocks_per_sm): ptxas then budgets the
    registers for that occupancy. Given the thread count alone it picks an occupancy itself and
    may squeeze a kernel into fewer registers than it needs, spilling (correlation, 672 threads
    on sm_87: 40 registers for 2 blocks per SM, 28 bytes of spills)."""
    import tvm_ffi
    from tvm import tirx

    def bound(loop):
        if loop.kind != tirx.ForKind.THREAD_BINDING or loop.thread_binding.thread_tag != "blockIdx.x":
            return loop
        body = tirx.AttrStmt(loop.loop_var, "tirx.launch_bounds_min_blocks_per_sm",
                             tirx.IntImm("int32", blocks_per_sm), loop.body)
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding,
                        loop.annotations)

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, bound), order="post"))


def is_cuda(target) -> bool:
    return target is not None and str(target.kind.name) == "cuda"


def apply_hand_schedules(mod, target, board=None):
    """Replace every PrimFunc of `mod` that carries `edgeflow.op` by its hand-scheduled form for
    `target` (CUDA or LLVM; CUDA tiles sized for `board`, see `gpu_board`). Other functions are
    returned untouched."""
    from edgeflow.compile import quantize_ops
    from edgeflow.compile.ops import correlation, warp

    schedulers = {"correlation": correlation.schedule_correlation, "warp": warp.schedule_warp,
                  "qconv2d": quantize_ops.schedule_qconv, "qdeconv2d": quantize_ops.schedule_qconv}
    todo = []
    for gv, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if attrs is None or OP_ATTR not in attrs or attrs.get("tirx.is_scheduled", False):
            continue
        op = str(attrs[OP_ATTR])
        if op not in schedulers:
            raise InternalError(f"no hand schedule for edgeflow.op={op!r}")
        todo.append((gv, schedulers[op](func, target, board)))
    if not todo:
        return mod
    out = mod.clone()
    for gv, func in todo:
        out.update_func(gv, func)
    return out


def to_fp16(mod):
    """`mod` (after `relax.transform.ToMixedPrecision`) with our operators run in fp16.

    ToMixedPrecision gives convolutions fp16 inputs but leaves `call_tir`s alone, so correlation
    and warp would read and write fp32. Each fp32 `call_tir` of ours becomes the fp16 variant of
    its PrimFunc (fp16 in and out, fp32 arithmetic inside): inputs that are casts of fp16 values
    to fp32 are read uncast, others are cast to fp16; the result is cast to fp32 for its users,
    and a user's cast back to fp16 reads the fp16 result directly."""
    from dataclasses import replace

    from tvm import relax

    from edgeflow.compile.ops.correlation import CorrelationSpec, spec_primfunc
    from edgeflow.compile.ops.warp import warp_primfunc

    def variant(func):
        if str(func.attrs[OP_ATTR]) == "correlation":
            return spec_primfunc(replace(CorrelationSpec.of(func), dtype="float16"))
        return warp_primfunc(func.params[0].shape, dtype="float16")

    def fp16_source(expr):
        """x when `expr` is (a variable bound to) astype(x, "float32") of an fp16 x, else None."""
        value = rewriter.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if (isinstance(value, relax.Call) and value.op.name == "relax.astype"
                and str(value.attrs.dtype) == "float32" and str(value.args[0].ty.dtype) == "float16"):
            return value.args[0]
        return None

    def half(expr):
        source = fp16_source(expr)
        return rewriter.builder_.emit(relax.op.astype(expr, "float16")) if source is None else source

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.name == "relax.astype" and str(call.attrs.dtype) == "float16":
                source = fp16_source(call.args[0])  # fp16 -> fp32 -> fp16: the fp16 value itself
                return call if source is None else source
            if call.op.name != "relax.call_tir" or str(call.ty.dtype) != "float32":
                return call
            gv = call.args[0]
            func = mod[gv] if gv in mod.functions else None
            if func is None or func.attrs is None or OP_ATTR not in func.attrs:
                return call
            if gv not in halves:
                halves[gv] = self.builder_.add_func(variant(func), f"{gv.name_hint}_fp16")
            out = relax.TensorType(call.ty.shape, "float16")
            result = self.builder_.emit(relax.call_tir(halves[gv], [half(a) for a in call.args[1].fields], out))
            return relax.op.astype(result, "float32")

    halves: dict = {}
    rewriter = Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


def node_args(node, names) -> dict:
    """The fx node's arguments by name, defaults filled in from the op's schema."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for arg in schema.arguments:
            if arg.name not in out and arg.has_default_value():
                out[arg.name] = arg.default_value
    missing = [n for n in names if n not in out]
    if missing:
        raise InternalError(f"{node.target}: missing arguments {missing}")
    return out


def _convert_correlation(node, importer):
    from edgeflow.compile.ops.correlation import convert_correlation

    return convert_correlation(node, importer)


def _convert_warp(node, importer):
    from edgeflow.compile.ops.warp import convert_warp

    return convert_warp(node, importer)


def _convert_leaky_relu(node, importer):
    from edgeflow.compile.ops.correlation import convert_leaky_relu

    return convert_leaky_relu(node, importer)


def _convert_qconv(node, importer):
    from edgeflow.compile.quantize_ops import convert

    return convert(node, importer, deconv=False)


def _convert_qdeconv(node, importer):
    from edgeflow.compile.quantize_ops import convert

    return convert(node, importer, deconv=True)


# For `from_exported_program(ep, custom_convert_map=CUSTOM_CONVERT_MAP)`: keys are the fx node
# targets' names (`torch.ops.edgeflow.correlation.default.__name__`). The LeakyReLU entry lets
# a correlation absorb the activation that follows it (FlowNetC's corr_activation).
CUSTOM_CONVERT_MAP = {"correlation.default": _convert_correlation, "warp.default": _convert_warp,
                      "leaky_relu.default": _convert_leaky_relu, "qconv2d.default": _convert_qconv,
                      "qdeconv2d.default": _convert_qdeconv}


_LAZY = {name: "correlation" for name in ("correlation_primfunc", "schedule_correlation", "emit_correlation",
                                          "CorrelationSpec", "plan_cuda", "cuda_report")}
_LAZY.update({name: "warp" for name in ("warp_primfunc", "schedule_warp", "emit_warp")})


def __getattr__(name):
    """The op modules' entry points, imported on first use (they import TVM)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
