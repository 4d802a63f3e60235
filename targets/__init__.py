"""The boards edgeflow compiles for: one table (`boards.json`), one entry per board, with aliases.

`get(name)` returns a `Board`; `board.tvm_target()` the TVM target (CUDA with an aarch64 host
for Jetsons, LLVM for CPUs); `board.occupancy(...)` and `board.roofline_seconds(...)` the static
performance model of a kernel on it. Per-SM limits are kept once per CUDA arch (`_gpu_archs` in
the table) and inherited by the boards. Adding a board is one entry in boards.json and one test.
Importing this package does not import TVM.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

TABLE = Path(__file__).with_name("boards.json")
DEFAULT = "jetson-orin-nano"
# Other names of CPU architectures -> the names LLVM triples use.
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def canonical_arch(arch: str) -> str:
    """A CPU architecture name as LLVM triples spell it: arm64 -> aarch64, amd64 -> x86_64."""
    arch = arch.lower()
    return ARCH_ALIASES.get(arch, arch)


def machine_arch() -> str:
    """This machine's CPU architecture as LLVM triples spell it (x86_64, aarch64)."""
    return canonical_arch(platform.machine())


@dataclass(frozen=True)
class Board:
    """One row of the table; GPU fields are None for CPU targets. Units: MHz, bytes, TFLOPS, GB/s."""

    name: str
    kind: str  # "cuda" or "cpu"
    description: str
    aliases: tuple = ()
    cuda_arch: str | None = None
    jetpack: str | None = None
    cuda_version: str | None = None
    host_triple: str | None = None
    host_cpu: str | None = None
    cross_cc: str | None = None
    sm_count: int | None = None
    gpu_clock_mhz: float | None = None
    power_mode: str | None = None
    # per-SM limits, from the board's arch in _gpu_archs
    warp_size: int | None = None
    max_threads_per_block: int | None = None
    max_threads_per_sm: int | None = None
    max_blocks_per_sm: int | None = None
    registers_per_sm: int | None = None
    max_registers_per_block: int | None = None
    max_registers_per_thread: int | None = None
    register_allocation_unit: int | None = None  # registers per warp are allocated in these units
    sm_partitions: int | None = None  # register-file partitions (warp schedulers) per SM
    shared_memory_per_sm: int | None = None
    max_shared_memory_per_block: int | None = None
    shared_memory_allocation_unit: int | None = None
    reserved_shared_memory_per_block: int | None = None  # kept by the driver for each block
    fp32_lanes_per_sm: int | None = None
    peak_fp32_tflops: float | None = None
    peak_fp16_tflops: float | None = None
    peak_int8_tops: float | None = None
    memory_bandwidth_gbs: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def cross_compiled(self) -> bool:
        """True when the host code is for another machine than this one."""
        return self.host_triple is not None and not _machine_matches(self.host_triple)

    def tvm_target(self):
        """The `tvm.target.Target` for this board (imports TVM)."""
        from tvm.target import Target

        return Target(self.tvm_target_json())

    def tvm_target_json(self) -> dict:
        """The TVM target as a JSON dict. TVM's own Orin tags name the wrong host CPU (Carmel);
        Orin's CPU is the Cortex-A78AE, which LLVM knows as cortex-a78."""
        host = self.llvm_json()
        if not self.is_cuda:
            return host
        return {"kind": "cuda", "arch": self.cuda_arch,
                "max_shared_memory_per_block": self.max_shared_memory_per_block,
                "max_threads_per_block": self.max_threads_per_block, "max_num_threads": self.max_threads_per_block,
                "thread_warp_size": self.warp_size, "registers_per_block": self.max_registers_per_block, "host": host}

    def llvm_json(self) -> dict:
        """The LLVM (CPU) target of this board's host processor."""
        if self.host_triple is None:  # this machine
            from tvm.target.codegen import llvm_get_system_cpu

            from edgeflow.runtime.threads import physical_cores

            return {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": physical_cores()}
        out = {"kind": "llvm", "mtriple": self.host_triple}
        if self.host_cpu and self.host_cpu != "generic":
            out["mcpu"] = self.host_cpu
        if self.host_triple.startswith("aarch64"):
            out["mattr"] = list(self.extra.get("mattr", ["+neon"]))  # aarch64-cpu: +dotprod (int8 sdot)
        return out

    def limits(self) -> dict:
        """The GPU limits the hand schedules and the GPU verifier use: the per-SM limits, SM count."""
        return {name: getattr(self, name) for name in _GPU_LIMITS + ("sm_count",)}

    def occupancy(self, registers: int, threads: int, shared_bytes: int = 0) -> dict:
        """Resident blocks per SM of a kernel with `registers` per thread, `threads` per block and
        `shared_bytes` of shared memory per block, computed as CUDA's occupancy calculator does
        (cuda_occupancy.h): registers allocated per warp in units, per register-file partition;
        shared memory in units plus the driver's reserve. Returns {"blocks_per_sm", "warps_per_sm",
        "occupancy" (resident warps / the SM's maximum), "limited_by" ("registers", "shared",
        "threads", "blocks", or "launch" when the block cannot launch at all)}."""
        warps = -(-threads // self.warp_size)
        regs_warp = _round_up(registers * self.warp_size, self.register_allocation_unit)
        smem = _round_up(shared_bytes + self.reserved_shared_memory_per_block, self.shared_memory_allocation_unit)
        max_warps = self.max_threads_per_sm // self.warp_size
        if (threads > self.max_threads_per_block or registers > self.max_registers_per_thread
                or regs_warp * _round_up(warps, self.sm_partitions) > self.max_registers_per_block
                or smem > self.max_shared_memory_per_block + self.reserved_shared_memory_per_block):
            return {"blocks_per_sm": 0, "warps_per_sm": 0, "occupancy": 0.0, "limited_by": "launch"}
        per_partition = self.registers_per_sm // self.sm_partitions
        by = {"threads": max_warps // warps, "blocks": self.max_blocks_per_sm,  # ties name these first
              "registers": (per_partition // regs_warp) * self.sm_partitions // warps if regs_warp
              else self.max_blocks_per_sm,
              "shared": self.shared_memory_per_sm // smem if smem else self.max_blocks_per_sm}
        blocks = min(by.values())
        return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
                "occupancy": round(blocks * warps / max_warps, 4), "limited_by": min(by, key=by.get)}

    def roofline_seconds(self, flops: float, bytes_moved: float, flops_fp16: float = 0) -> tuple[float, str]:
        """(seconds, "compute" or "memory"): the roofline time of a kernel on this board, the larger
        of its arithmetic time at the table's peaks (fp16 operations at peak_fp16_tflops, the
        others at peak_fp32_tflops) and its DRAM time at memory_bandwidth_gbs."""
        compute = (flops - flops_fp16) / (self.peak_fp32_tflops * 1e12) + flops_fp16 / (self.peak_fp16_tflops * 1e12)
        memory = bytes_moved / (self.memory_bandwidth_gbs * 1e9)
        return max(compute, memory), "compute" if compute >= memory else "memory"


_GPU_LIMITS = ("warp_size", "max_threads_per_block", "max_threads_per_sm", "max_blocks_per_sm", "registers_per_sm",
               "max_registers_per_block", "max_registers_per_thread", "register_allocation_unit", "sm_partitions",
               "shared_memory_per_sm", "max_shared_memory_per_block", "shared_memory_allocation_unit",
               "reserved_shared_memory_per_block", "fp32_lanes_per_sm")


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _machine_matches(triple: str) -> bool:
    return canonical_arch(triple.split("-")[0]) == machine_arch()


def cuda_releases() -> dict[str, list[str]]:
    """{CUDA release: PyPI pins of its device toolchain} (the table's `_cuda_releases`)."""
    return {k: v for k, v in json.loads(TABLE.read_text())["_cuda_releases"].items() if not k.startswith("_")}


def _load() -> dict[str, Board]:
    raw = json.loads(TABLE.read_text())
    archs = raw.get("_gpu_archs", {})
    known = set(Board.__dataclass_fields__)
    boards = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        entry = {**archs.get(entry.get("cuda_arch"), {}), **entry}
        fields = {k: v for k, v in entry.items() if k in known}
        extra = {k: v for k, v in entry.items() if k not in known}
        boards[name] = Board(name=name, aliases=tuple(entry.get("aliases", ())), extra=extra,
                             **{k: v for k, v in fields.items() if k != "aliases"})
    return boards


BOARDS: dict[str, Board] = _load()


def names() -> list[str]:
    """Board names in table order."""
    return list(BOARDS)


def get(name: str) -> Board:
    """The board called `name` or one of its aliases; InputError listing the choices otherwise."""
    from edgeflow.errors import choices_error

    if name in BOARDS:
        return BOARDS[name]
    for board in BOARDS.values():
        if name in board.aliases:
            return board
    raise choices_error("target", name, list(BOARDS) + [a for b in BOARDS.values() for a in b.aliases])
