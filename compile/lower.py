"""Lowering per target: Relax -> a TVM executable, with ahead-of-time device code for Jetsons.

CUDA: mixed precision when asked, our hand schedules for the custom ops, our convolution rules
(`cuda_convs`: deconvolutions split by output phase, tensor cores for narrow fp16 convolutions, a
thread per pixel for the 2-channel flow heads) and dlight's default GPU schedules for the rest; TVM's CUDA codegen gives CUDA C, which `cuda_toolchain` compiles with the
NVRTC/ptxas of the board's CUDA release into a cubin; the host part is cross-compiled for aarch64.
CPU: our convolution computes and schedules (`cpu_schedules`), LLVM for the board's (or this
machine's) CPU.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class DeviceCode:
    """Device code of one CUDA build: the CUDA C, its cubin, TVM's function info, ptxas stats."""

    source: str = ""
    cubin: bytes = b""
    func_info: dict = field(default_factory=dict)
    kernels: list = field(default_factory=list)  # KernelResources as dicts, with kernel_stats
    stats: dict = field(default_factory=dict)  # kernel name -> kernel_stats.kernel_stats(...)

    def metadata_json(self) -> str:
        """The function-info JSON that `runtime.LoadMetaDataFromJSON` reads on the device."""
        import tvm

        return json.dumps({"tvm_version": tvm.__version__, "func_info": self.func_info})


# TVM's function registry and TOPI's tag scope are global to the process: builds in several
# threads take turns (re-entrant: `build` holds it around `capture_cuda`).
TVM_LOCK = threading.RLock()
CUDA_BUILD = "target.build.cuda"


def _param_type(p) -> str:
    try:
        return str(p.dtype)
    except AttributeError:  # pointer-typed parameters have no dtype
        return "handle"


@contextmanager
def capture_cuda(code: DeviceCode):
    """Within the block, TVM's `target.build.cuda` also records into `code` the CUDA C, the
    function info and the kernel statistics of what it builds. The wrapper is installed on entry
    and TVM's own function restored on exit (errors included); concurrent blocks in other threads
    wait for each other, so each build fills only its own `code`."""
    import tvm
    import tvm_ffi

    from edgeflow.compile import kernel_stats

    with TVM_LOCK:
        original = tvm.get_global_func(CUDA_BUILD)

        def build_cuda(mod, target):
            module = original(mod, target)
            code.source = module.inspect_source()
            code.stats = kernel_stats.collect(mod)
            for gv, func in mod.functions.items():
                code.func_info[str(func.attrs["global_symbol"])] = {
                    "name": "", "arg_types": [_param_type(p) for p in func.params],
                    "launch_param_tags": [str(t) for t in func.attrs.get("tirx.kernel_launch_params", [])]}
            return module

        tvm_ffi.register_global_func(CUDA_BUILD, build_cuda, override=True)
        try:
            yield code
        finally:
            tvm_ffi.register_global_func(CUDA_BUILD, original, override=True)


def _drop_device_imports(module) -> None:
    """Remove the CUDA-source modules from a library's import tree (the cubin ships apart)."""
    kids = list(module.imports)
    if any(c.kind == "cuda" for c in kids):
        module.clear_imports()
        for c in kids:
            if c.kind != "cuda":
                module.import_module(c)
    for c in kids:
        if c.kind != "cuda":
            _drop_device_imports(c)


def prepare(mod, params: list, names: list[str], precision: str = "fp32", cuda: bool = False):
    """Rewrites before lowering: for CUDA (`cuda`), deconvolutions split by output phase
    (`cuda_convs.split_deconvolutions`); for fp32 on a CPU, the wide 3x3 convolutions as Winograd
    F(2x2, 3x3) (`cpu_schedules.winograd_convolutions`: the package stores their transformed
    weights, [4, 4, C, F] under the weight's name); mixed precision (for CUDA with fp16 casts moved
    before concatenations, `cuda_convs.cast_before_concat`); then parameter transforms done once here.

    fp16: convolutions in fp16 with fp32 accumulation, correlation and warp on fp16 data
    (`ops.to_fp16`). The casts and reshapes that depend only on parameters (fp16 weights, biases
    as [1,C,1,1]) are lifted out of `main` and run now, on this CPU, so the package stores the
    transformed parameters and the device does none of that work per frame.
    mod: `main(img1, img2, *params)`; params: numpy arrays named `names` -> (mod, transformed
    arrays, their names: the name of the parameter each one is made from, e.g. a bias reshaped to
    [1,C,1,1] keeps the bias's name).
    """
    import tvm
    from tvm import relax

    if cuda:
        from edgeflow.compile.cuda_convs import split_deconvolutions

        mod = split_deconvolutions(mod)
    if not cuda and precision == "fp32":
        from edgeflow.compile.cpu_schedules import winograd_convolutions

        mod = winograd_convolutions(mod)  # its weight transform is lifted below, done once here
    if precision == "fp16":
        from edgeflow.compile.ops import to_fp16

        mod = to_fp16(relax.transform.ToMixedPrecision(out_dtype="float32")(mod))
        if cuda:
            from edgeflow.compile.cuda_convs import cast_before_concat

            mod = cast_before_concat(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    lifted = mod["main_transform_params"].with_attr("global_symbol", "main")
    transform = tvm.IRModule({gv: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)})
    transform["main"] = lifted  # with the PrimFuncs it calls (int8 weight packing)
    vm = relax.VirtualMachine(tvm.compile(transform, target="llvm"), tvm.cpu())
    params = [p.numpy() for p in vm["main"]([tvm.runtime.tensor(p) for p in params])]
    kept = {gv: f for gv, f in mod.functions_items() if gv.name_hint != "main_transform_params"}
    kept = relax.transform.DeadCodeElimination()(tvm.IRModule(kept, attrs=mod.attrs, global_infos=mod.global_infos))
    return (kept, params,
            _lifted_names(lifted, names))


def _lifted_names(func, names: list[str]) -> list[str]:
    """Name each output of a lifted parameter transform after the one input it derives from."""
    from tvm import relax

    tuple_param = func.params[0]
    sources: dict = {}  # var -> indices of the input parameters it is computed from
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(tuple_param):
                sources[b.var] = {v.index}
            else:
                sources[b.var] = set().union(*(sources.get(x, set()) for x in relax.analysis.free_vars(v)))
    out = func.body.body
    fields = out.fields if isinstance(out, relax.Tuple) else next(
        b.value.fields for blk in func.body.blocks for b in blk.bindings if b.var.same_as(out))
    result, seen = [], {}
    for i, f in enumerate(fields):
        src = sources.get(f, set())
        name = names[next(iter(src))] if len(src) == 1 else f"lifted.{i}"
        seen[name] = seen.get(name, 0) + 1
        # several made from one (int8: packed weights, zero-point correction): name.1, name.2, ...
        result.append(name if seen[name] == 1 else f"{name}.{seen[name] - 1}")
    return result


def build(mod, board, tuning=None):
    """Lower the prepared `mod` for `board`; returns (executable, DeviceCode or None). tuning: a
    `tune.TuningDatabase` whose faster schedules replace the hand ones (it records which). Safe
    to call from several threads: the builds take turns."""
    with TVM_LOCK:
        return _build(mod, board, tuning)


def fused(mod, board):
    """The prepared `mod` as the schedules see it: our CPU convolution computes, Relax's "zero"
    pipeline (legalize, fuse), the hand-scheduled custom ops. `tune` extracts its tasks here."""
    from tvm import relax

    target = board.tvm_target()
    with target:
        if not board.is_cuda:
            from edgeflow.compile import cpu_schedules

            mod = cpu_schedules.legalize(mod)  # convolutions as computes shaped for its schedules
        mod = relax.get_pipeline("zero")(mod)
        return _apply_hand_schedules(mod, target, board)


def _build(mod, board, tuning=None):
    import tvm
    import tvm.s_tir.dlight as dl

    target = board.tvm_target()
    mod = fused(mod, board)
    with target:
        if tuning is not None:
            mod = tuning.apply(mod, target)
        if board.is_cuda:
            from edgeflow.compile.cuda_convs import NarrowConv, TensorCoreConv

            mod = dl.ApplyDefaultSchedule(TensorCoreConv(), NarrowConv(), dl.gpu.Matmul(), dl.gpu.GEMV(),
                                          dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        else:
            from edgeflow.compile import cpu_schedules

            mod = cpu_schedules.schedule(mod)
    if not board.is_cuda:
        return tvm.compile(mod, target=target), None
    from edgeflow.compile import kernel_stats, sass
    from edgeflow.compile.cuda_toolchain import compile_cuda

    with capture_cuda(DeviceCode()) as code:
        ex = tvm.compile(mod, target=target)
    code.cubin, resources = compile_cuda(code.source, board.cuda_arch, board.cuda_version)
    code.kernels = kernel_stats.merge(resources, code.stats, mod)
    classes = sass.instruction_classes(code.cubin, board.cuda_arch)
    for k in code.kernels:  # what the SASS executes; None where this machine cannot read it
        k["sass"] = None if classes is None else classes.get(k["name"])
    return ex, code


def _apply_hand_schedules(mod, target, board):
    from edgeflow.compile.ops import apply_hand_schedules

    return apply_hand_schedules(mod, target, board if board.is_cuda else None)


def export(ex, path: str, board) -> None:
    """Write the executable's host library to `path`, cross-compiled for the board's CPU."""
    import shutil

    from edgeflow.errors import MissingDependency

    kwargs = {}
    if board.cross_compiled:
        if shutil.which(board.cross_cc) is None:
            raise MissingDependency(f"cross compiler {board.cross_cc} not found; install it with "
                                    f"`apt-get install g++-aarch64-linux-gnu` (make install does)")
        kwargs["cc"] = board.cross_cc
    if board.is_cuda:
        _drop_device_imports(ex.mod)
    ex.export_library(path, **kwargs)


def cpu_int8_kernels(ex) -> list[dict]:
    """The int8 kernels of a CPU build, read from its machine code: [{"name", "instructions":
    {mnemonic: count}}] for each function of our qconv2d / qdeconv2d PrimFuncs, counting the
    integer dot products (x86 `vpdpbusd`: AVX-512 VNNI; aarch64 `sdot`/`udot`/`usdot`) and, for
    comparison, float FMAs. What `edgeflow inspect` shows as int8 kernels."""
    import re

    mnemonics = ("vpdpbusd", "usdot", "sdot", "udot", "vfmadd231ps")
    asm = "\n".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")
    out: dict[str, dict] = {}
    counts = None
    for line in asm.splitlines():
        label = re.match(r"^([A-Za-z_][\w.]*):", line)
        if label:
            base = re.sub(r"_compute_.*$", "", label.group(1))
            counts = out.setdefault(base, dict.fromkeys(mnemonics, 0)) if re.match(r"q(de)?conv2d\d*$", base) else None
        elif counts is not None:
            op = line.split()[0] if line.split() else ""
            if op in counts:
                counts[op] += 1
    return [{"name": name, "instructions": {k: v for k, v in c.items() if v}} for name, c in sorted(out.items())]
