"""FlowNet2's custom operators (correlation, warp) as TIR, with hand schedules for CUDA and CPUs.

The frontend maps the torch custom ops `edgeflow::correlation` and `edgeflow::warp` to
`call_tir`s of unscheduled PrimFuncs (`CUSTOM_CONVERT_MAP`, for
`from_exported_program(..., custom_convert_map=...)`). Those PrimFuncs carry the attribute
`edgeflow.op`; `apply_hand_schedules` later swaps each for its hand-scheduled form for the
target, marked `tirx.is_scheduled` so that dlight leaves it alone.

Schedules read the GPU's limits from `GpuLimits` (or a targets-table board, or its `limits()`
dict). Importing this package does not import TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

OP_ATTR = "edgeflow.op"
PARAMS_ATTR = "edgeflow.params"
# Relax's FuseOps must not merge our functions into their neighbours (FuseTIR would drop the
# attributes that find them, and the hand schedules cover one op): pattern kOpaque.
OPAQUE = {"op_pattern": 8}


@dataclass(frozen=True)
class GpuLimits:
    """What a hand schedule may use on one GPU. Bytes, threads, registers (32-bit), per block/SM."""

    max_shared_memory_per_block: int = 49152
    max_threads_per_block: int = 1024
    registers_per_sm: int = 65536
    max_registers_per_block: int = 65536  # 32K on sm_53 (Maxwell)
    max_registers_per_thread: int = 255
    warp_size: int = 32
    max_threads_per_sm: int = 1536
    shared_memory_per_sm: int = 167936
    max_blocks_per_sm: int = 16
    sm_count: int = 8
    fp32_lanes_per_sm: int = 128  # FP32 FMA per clock per SM: 128 Ampere/Maxwell, 64 Volta

    def verifier_constraints(self) -> dict:
        """Constraints for `tvm.s_tir.analysis.verify_gpu_code`."""
        return {"max_shared_memory_per_block": self.max_shared_memory_per_block,
                "max_threads_per_block": self.max_threads_per_block,
                "max_thread_x": self.max_threads_per_block, "max_thread_y": self.max_threads_per_block,
                "max_thread_z": 64, "max_vthread": 1, "max_vector_bytes": 16,
                "max_local_memory_per_block": 2 ** 31 - 1}


# Jetson GPUs by CUDA arch (Orin sm_87, Xavier sm_72, Nano sm_53); a board entry overrides these.
ARCH_LIMITS = {
    "sm_87": GpuLimits(),
    "sm_72": GpuLimits(max_threads_per_sm=2048, shared_memory_per_sm=98304, max_blocks_per_sm=32,
                       sm_count=8, fp32_lanes_per_sm=64),
    "sm_53": GpuLimits(max_threads_per_sm=2048, shared_memory_per_sm=65536, max_blocks_per_sm=32,
                       sm_count=1, fp32_lanes_per_sm=128, max_registers_per_block=32768),
}


def gpu_limits(limits=None, target=None) -> GpuLimits:
    """Normalise `limits` (GpuLimits, a board with `limits()`, a dict, an object with the same
    attribute names, or None) on top of the defaults for `target`'s CUDA arch."""
    arch = None
    if target is not None:
        arch = str(target.attrs.get("arch", "")) if hasattr(target, "attrs") else None
    base = ARCH_LIMITS.get(arch, GpuLimits())
    if limits is None:
        return base
    if isinstance(limits, GpuLimits):
        return limits
    if hasattr(limits, "limits") and callable(limits.limits):
        board = limits
        limits = dict(board.limits())
        if getattr(board, "sm_count", None):
            limits["sm_count"] = board.sm_count
        arch = getattr(board, "cuda_arch", None) or arch
        base = ARCH_LIMITS.get(arch, base)
    get = limits.get if isinstance(limits, dict) else (lambda k: getattr(limits, k, None))
    found = {f.name: int(get(f.name)) for f in fields(GpuLimits) if get(f.name) is not None}
    return replace(base, **found)


def is_cuda(target) -> bool:
    return target is not None and str(target.kind.name) == "cuda"


def apply_hand_schedules(mod, target, limits=None):
    """Replace every PrimFunc of `mod` that carries `edgeflow.op` by its hand-scheduled form for
    `target` (CUDA or LLVM). Other functions are returned untouched."""
    from edgeflow.compile.ops import correlation, warp

    schedulers = {"correlation": correlation.schedule_correlation, "warp": warp.schedule_warp}
    todo = []
    for gv, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if attrs is None or OP_ATTR not in attrs or attrs.get("tirx.is_scheduled", False):
            continue
        op = str(attrs[OP_ATTR])
        if op not in schedulers:
            raise ValueError(f"no hand schedule for edgeflow.op={op!r}")
        todo.append((gv, schedulers[op](func, target, limits)))
    if not todo:
        return mod
    out = mod.clone()
    for gv, func in todo:
        out.update_func(gv, func)
    return out


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
        raise ValueError(f"{node.target}: missing arguments {missing}")
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


# For `from_exported_program(ep, custom_convert_map=CUSTOM_CONVERT_MAP)`: keys are the fx node
# targets' names (`torch.ops.edgeflow.correlation.default.__name__`). The LeakyReLU entry lets
# a correlation absorb the activation that follows it (FlowNetC's corr_activation).
CUSTOM_CONVERT_MAP = {"correlation.default": _convert_correlation, "warp.default": _convert_warp,
                      "leaky_relu.default": _convert_leaky_relu}


_LAZY = {name: "correlation" for name in ("correlation_primfunc", "schedule_correlation", "emit_correlation",
                                          "CorrelationSpec", "plan_cuda", "cuda_report")}
_LAZY.update({name: "warp" for name in ("warp_primfunc", "schedule_warp", "emit_warp")})


def __getattr__(name):
    """The op modules' entry points, imported on first use (they import TVM)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
