"""Device-code toolchain for Jetson boards: CUDA C -> PTX (NVRTC) -> cubin (ptxas), ahead of time.

A JetPack 6 board runs CUDA 12.6 and will not load cubins from a newer toolkit, so device code
is compiled with the NVRTC and ptxas of the board's CUDA release, installed from PyPI
(`nvidia-cuda-nvrtc-cu12`, `nvidia-cuda-nvcc-cu12`, and the headers of `nvidia-cuda-runtime-cu12`
and `nvidia-cuda-cccl-cu12`)
into `<venv>/cuda/<version>` by the Makefile. NVRTC is loaded with ctypes; no nvcc needed.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeflow.errors import InternalError, MissingDependency
from edgeflow.targets import cuda_releases

TOOLCHAIN_ROOT = Path(os.environ.get("EDGEFLOW_CUDA_ROOT", Path(sys.prefix) / "cuda"))


@dataclass(frozen=True)
class Toolchain:
    """One CUDA release's NVRTC library, ptxas binary and include directories."""

    version: str
    nvrtc: Path
    ptxas: Path
    include: Path  # the runtime headers (cuda_fp16.h, mma.h, ...)
    cccl_include: Path  # libcu++ (cuda/std/...), which TVM's CUDA code includes
    crt_include: Path  # the compiler's crt/ headers, which mma.h includes (fp16 kernels)


def toolchain(cuda_version: str) -> Toolchain:
    """The toolchain for CUDA `cuda_version` (e.g. "12.6"), or MissingDependency with the fix."""
    base = TOOLCHAIN_ROOT / cuda_version / "nvidia"
    libs = sorted((base / "cuda_nvrtc" / "lib").glob("libnvrtc.so*"))
    tc = Toolchain(cuda_version, libs[0] if libs else base / "cuda_nvrtc/lib/libnvrtc.so",
                   base / "cuda_nvcc" / "bin" / "ptxas", base / "cuda_runtime" / "include",
                   base / "cuda_cccl" / "include", base / "cuda_nvcc" / "include")
    missing = [p for p in (tc.nvrtc, tc.ptxas, tc.include, tc.cccl_include, tc.crt_include) if not p.exists()]
    if missing:
        releases = cuda_releases()
        fix = (f"install it with `make cuda-{cuda_version}` (NVRTC, ptxas and headers from PyPI)"
               if cuda_version in releases else
               f"PyPI has no CUDA {cuda_version} toolchain: copy NVRTC, ptxas and the headers of a "
               f"CUDA {cuda_version} install into {base} in the same layout as {TOOLCHAIN_ROOT / next(iter(releases))}")
        raise MissingDependency(f"CUDA {cuda_version} device toolchain not found ({missing[0]}); {fix}")
    return tc


def _check(lib, status: int, prog=None) -> None:
    if status != 0:
        msg = ctypes.c_char_p(lib.nvrtcGetErrorString(status)).value.decode()
        log = ""
        if prog is not None:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
        first = next((line for line in log.splitlines() if "error" in line), log.strip()[:300])
        raise InternalError(f"NVRTC could not compile the generated CUDA code: {msg}: {first}")


def cuda_to_ptx(source: str, arch: str, tc: Toolchain) -> str:
    """Compile CUDA C `source` to PTX for `arch` (e.g. "sm_87") with the toolchain's NVRTC."""
    lib = ctypes.CDLL(str(tc.nvrtc))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"edgeflow.cu", 0, None, None))
    try:
        opts = [f"--gpu-architecture=compute_{arch.split('_')[1]}", "--std=c++17", "-default-device",
                f"-I{tc.include}", f"-I{tc.cccl_include}", f"-I{tc.crt_include}"]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        _check(lib, lib.nvrtcCompileProgram(prog, len(opts), arr), prog)
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, buf))
        return buf.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel: registers per thread, spills (bytes), shared and stack."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    stack_bytes: int


_FUNC = re.compile(r"Compiling entry function '([^']+)'")
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[KernelResources]:
    """Per-kernel resources from `ptxas -v` output."""
    out, cur = [], None
    for line in log.splitlines():
        if m := _FUNC.search(line):
            cur = {"name": m.group(1), "registers": 0, "spill_stores": 0, "spill_loads": 0,
                   "shared_bytes": 0, "stack_bytes": 0}
            out.append(cur)
        elif cur is not None:
            if m := _SPILL.search(line):
                cur.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            if m := _USED.search(line):
                cur["registers"] = int(m.group(1))
            if m := _SMEM.search(line):
                cur["shared_bytes"] = int(m.group(1))
    return [KernelResources(**k) for k in out]


def ptx_to_cubin(ptx: str, arch: str, tc: Toolchain) -> tuple[bytes, list[KernelResources]]:
    """Assemble PTX into a cubin for `arch` with the toolchain's ptxas; returns (cubin, resources)."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        res = subprocess.run([str(tc.ptxas), f"-arch={arch}", "-v", "-O3", str(src), "-o", str(dst)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            first = next((line for line in res.stderr.splitlines() if "error" in line.lower()), res.stderr[-300:])
            raise InternalError(f"ptxas failed for {arch}: {' '.join(first.split())}")
        return dst.read_bytes(), parse_ptxas(res.stderr + res.stdout)


def compile_cuda(source: str, arch: str, cuda_version: str) -> tuple[bytes, list[KernelResources]]:
    """CUDA C -> cubin for `arch` with CUDA `cuda_version`'s NVRTC and ptxas."""
    tc = toolchain(cuda_version)
    return ptx_to_cubin(cuda_to_ptx(with_intrinsics(source, tc), arch, tc), arch, tc)


def with_intrinsics(source: str, tc: Toolchain) -> str:
    """`source`, with the definitions of the SM 6.1 intrinsics (`__dp4a`: int8 kernels) where it
    calls them and the toolchain's NVRTC only declares them (CUDA 11: ptxas then fails with
    "Unresolved extern function '_Z6__dp4aiii'")."""
    if "__dp4a" in source and tc.version.split(".")[0] == "11":
        return "#include <sm_61_intrinsics.hpp>\n" + source
    return source
