"""The boards edgeflow compiles for: one table (`boards.json`), one entry per board, with aliases.

`get(name)` returns a `Board`; `board.tvm_target()` the TVM target (CUDA with an aarch64 host
for Jetsons, LLVM for CPUs). Adding a board is one entry in boards.json and one test. Importing
this package does not import TVM.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

TABLE = Path(__file__).with_name("boards.json")
DEFAULT = "jetson-orin-nano"


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
    max_shared_memory_per_block: int | None = None
    shared_memory_per_sm: int | None = None
    max_threads_per_block: int | None = None
    max_threads_per_sm: int | None = None
    registers_per_sm: int | None = None
    max_blocks_per_sm: int | None = None
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
                "thread_warp_size": 32, "registers_per_block": self.registers_per_sm, "host": host}

    def llvm_json(self) -> dict:
        """The LLVM (CPU) target of this board's host processor."""
        if self.host_triple is None:  # this machine
            from tvm.target.codegen import llvm_get_system_cpu

            return {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": _physical_cores()}
        out = {"kind": "llvm", "mtriple": self.host_triple}
        if self.host_cpu and self.host_cpu != "generic":
            out["mcpu"] = self.host_cpu
        if self.host_triple.startswith("aarch64"):
            out["mattr"] = ["+neon"]
        return out

    def limits(self) -> dict:
        """The GPU limits the hand schedules and the GPU verifier use."""
        return {"max_shared_memory_per_block": self.max_shared_memory_per_block,
                "max_threads_per_block": self.max_threads_per_block,
                "max_threads_per_sm": self.max_threads_per_sm, "registers_per_sm": self.registers_per_sm,
                "shared_memory_per_sm": self.shared_memory_per_sm, "max_blocks_per_sm": self.max_blocks_per_sm,
                "warp_size": 32}


def _machine_matches(triple: str) -> bool:
    arch = platform.machine().lower()
    return triple.split("-")[0] in (arch, {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch))


def _physical_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load() -> dict[str, Board]:
    raw = json.loads(TABLE.read_text())
    known = set(Board.__dataclass_fields__)
    boards = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
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
