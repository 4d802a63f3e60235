"""Checking GPU kernels without a GPU: numerics on the CPU, TVM's GPU verifier, ptxas resources.

- `serialize_threads(func)`: the same scheduled TIR with every thread binding turned into a
  serial loop and every shared/local buffer into a plain one. Built for LLVM and run on the
  CPU it computes what the kernel computes (each "thread" redoes the cooperative loads, which
  changes nothing), so tiling, halo and index bugs of a schedule show up as wrong numbers.
- `run_primfunc(func, inputs, target)`: build a PrimFunc and run it on numpy arrays.
- `verify_gpu(func, target, board)`: TVM's GPU code verifier (threads, shared memory, vector
  width) on the lowered function, against a targets-table board's limits.
- `cuda_source(func, target)`, `ptxas_resources(source, arch)`: TVM's CUDA C for a function,
  and what ptxas makes of it (registers, spills, shared memory per kernel), with the board's
  CUDA toolchain (`edgeflow.compile.cuda_toolchain`) when installed, else `nvcc` on PATH.
Occupancy is the board's own model: `edgeflow.targets.Board.occupancy`.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeflow.compile.ops import gpu_board
from edgeflow.errors import InternalError, MissingDependency, one_line

GPU_SCOPES = ("shared", "shared.dyn", "local", "warp")


# --------------------------------------------------------------------------------------------
# numerics of a GPU schedule on the CPU


def serialize_threads(func):
    """`func` (scheduled TIR) with thread-bound loops made serial and GPU scopes made global."""
    import tvm_ffi
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    names = []

    def collect(block):
        names.append(block.name_hint)

    tvm_ffi.structural_walk(sch.mod["main"].body, (s_tir.SBlock, collect))
    for name in names:
        if name == "root":
            continue
        blk = sch.get_sblock(name)
        for idx, region in enumerate(sch.get(blk).writes):
            if region.source.scope() in GPU_SCOPES:
                sch.set_scope(blk, idx, "global")

    def unbind(loop):
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body,
                        annotations=loop.annotations)

    out = sch.mod["main"]
    body = tvm_ffi.structural_map(out.body, (tirx.For, unbind), order="post")
    return out.with_body(body).without_attr("target")


def run_primfunc(func, inputs, target=None, outputs=None):
    """Build `func` for `target` (default: LLVM for this CPU) and call it with the numpy arrays
    `inputs`; the remaining parameters are outputs, allocated from their buffer shapes (or
    given as `outputs`). Returns the outputs as numpy arrays."""
    import numpy as np
    import tvm

    target = target or {"kind": "llvm"}
    lib = tvm.compile(_module(func), target=tvm.target.Target(target))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    params = list(func.params)[len(inputs):]
    if outputs is None:
        outputs = [np.zeros([int(s) for s in p.shape], str(p.dtype)) for p in params]
    outs = [tvm.runtime.tensor(o, dev) for o in outputs]
    lib.mod["main"](*args, *outs)
    return [o.numpy() for o in outs]


def run_serialized(func, inputs):
    """Numerics of GPU-scheduled `func` on the CPU: `run_primfunc(serialize_threads(func))`."""
    return run_primfunc(serialize_threads(func), inputs)


# --------------------------------------------------------------------------------------------
# TVM's GPU verifier


def lower_device(func, target):
    """`func` lowered as the default TIR pipeline does, up to (not including) the host/device
    split: what `verify_gpu_code` expects."""
    import tvm
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerCrossThreadReduction(),
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.LiftThreadBinding(),
        s_tir.transform.ManifestSharedMemoryLocalStage(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerAutoCopy(), s_tir.transform.UnifyThreadBinding(),
        s_tir.transform.LowerMatchBuffer(), s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32), s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True), tirx.transform.StorageRewrite(),
        tirx.transform.UnrollLoop(), tirx.transform.StmtSimplify(),
    ]
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    mod = tvm.IRModule({"main": func.with_attr("target", target)})
    with tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes)(mod)
    return mod["main"]


def verify_gpu(func, target, board=None) -> bool:
    """TVM's GPU code verifier on scheduled `func` with the limits of `board` (see `gpu_board`)."""
    from tvm.s_tir.analysis import verify_gpu_code

    board = gpu_board(board, target)
    threads = board.max_threads_per_block
    constraints = {"max_shared_memory_per_block": board.max_shared_memory_per_block,
                   "max_threads_per_block": threads, "max_thread_x": threads, "max_thread_y": threads,
                   "max_thread_z": 64, "max_vthread": 1, "max_vector_bytes": 16,
                   "max_local_memory_per_block": 2 ** 31 - 1}
    return bool(verify_gpu_code(lower_device(func, target), constraints))


# --------------------------------------------------------------------------------------------
# CUDA source and ptxas


def cuda_source(func, target) -> str:
    """TVM's CUDA C for scheduled `func` (one PrimFunc or an IRModule) and a CUDA `target`."""
    import tvm

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if "host" not in str(target):
        target = tvm.target.Target(target, host={"kind": "llvm"})
    lib = tvm.compile(_module(func), target=target)
    return _find_cuda(lib.mod).inspect_source()


def _module(func):
    """An IRModule holding `func` as its entry "main" (our PrimFuncs carry no global symbol)."""
    import tvm

    if isinstance(func, tvm.IRModule):
        return func
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _find_cuda(module):
    if module.kind == "cuda":
        return module
    for child in module.imports:
        found = _find_cuda(child)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_archs() -> tuple[str, ...]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return ()
    res = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    return tuple(a.replace("compute_", "sm_") for a in res.stdout.split())


def _toolchains():
    """Installed CUDA toolchains of `cuda_toolchain`, newest first."""
    try:
        from edgeflow.compile import cuda_toolchain as ct
    except ImportError:
        return []
    root = Path(ct.TOOLCHAIN_ROOT)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir(), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)], reverse=True):
        try:
            out.append(ct.toolchain(d.name))
        except Exception:  # noqa: BLE001 - incomplete install: skip
            continue
    return out


def ptxas_tool(arch: str, cuda_version: str | None = None) -> str | None:
    """Which compiler `ptxas_resources` uses for `arch`: "cuda-<version>" (an installed board
    toolchain: `cuda_version` if installed, else the newest that supports `arch`), "nvcc" (on
    PATH), or None when nothing here can compile for `arch`."""
    num = int(arch.split("_")[1])
    usable = [tc.version for tc in _toolchains() if num >= _min_arch(tc.version)]
    if cuda_version in usable:
        return f"cuda-{cuda_version}"
    if usable:
        return f"cuda-{usable[0]}"
    if arch in _nvcc_archs():
        return "nvcc"
    return None


def _min_arch(cuda_version: str) -> int:
    """Oldest sm a CUDA release compiles for (12.x: Maxwell sm_50; 13.x: Turing sm_75)."""
    major = int(cuda_version.split(".")[0])
    return 75 if major >= 13 else 50 if major >= 12 else 35


def ptxas_resources(source: str, arch: str, cuda_version: str | None = None) -> list:
    """Per-kernel `KernelResources` (registers, spill stores/loads, shared, stack bytes) of CUDA
    C `source` compiled for `arch`; RuntimeError when no toolchain here supports `arch`."""
    from edgeflow.compile import cuda_toolchain as ct

    tool = ptxas_tool(arch, cuda_version)
    if tool is None:
        raise MissingDependency(f"no CUDA toolchain here compiles for {arch} (install the board's with "
                           f"`make cuda-<version>`, or an nvcc that lists it)")
    if tool.startswith("cuda-"):
        _, resources = ct.compile_cuda(source, arch, tool[5:])
        return resources
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.cu"
        src.write_text(source)
        res = subprocess.run([shutil.which("nvcc"), "--cubin", f"-arch={arch}", "-Xptxas", "-v", "-O3",
                              str(src), "-o", str(Path(d) / "kernel.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise InternalError(f"nvcc failed for {arch}: {one_line(Exception(res.stderr[-300:]))}")
    return ct.parse_ptxas(res.stderr + res.stdout)
