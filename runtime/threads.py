"""CPU threads for the TVM runtime: how many there are, and a thread whose TVM pool uses them.

TVM's thread pool is per calling thread and sized once, when that thread first needs it: by
$TVM_NUM_THREADS, else half the logical CPUs on x86 (one on a 2-core machine), and a later
`runtime.config_threadpool` cannot grow a pool that exists. So the Engine runs its network on a
thread of its own (`PoolThread`) whose pool it sizes before anything else runs there: the count
holds whatever TVM's heuristics and whatever other threads did before.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from edgeflow.errors import InputError

# TVM's AffinityMode kSpecifyThreadShareAllCore: the workers share the CPUs passed.
_SHARE_CPUS = -3


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on, one per physical core first, then their SMT
    siblings (so that N threads land on N cores)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    first, siblings, seen = [], [], set()
    for cpu in cpus:
        core = _core_of(cpu)
        (siblings if core in seen else first).append(cpu)
        seen.add(core)
    return first + siblings


def physical_cores() -> int:
    """The physical cores among the CPUs this process may run on (no SMT siblings)."""
    return len({_core_of(cpu) for cpu in allowed_cpus()})


def _core_of(cpu: int):
    topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()
    except OSError:  # no topology (containers, other systems): count each CPU as a core
        return ("cpu", str(cpu))


def check_threads(threads: int | None) -> int:
    """`threads`, or every physical core when None; InputError unless a positive integer."""
    if threads is None:
        return physical_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads={threads!r}: expected a positive integer (or None for every core)")
    return threads


class PoolThread:
    """One worker thread whose TVM thread pool has `threads` threads (every physical core when
    None); `call(fn, *args)` runs `fn` there and returns its result. `threads` afterwards holds
    the count TVM reports for that pool."""

    def __init__(self, threads: int | None = None, name: str = "edgeflow-engine"):
        requested = check_threads(threads)
        self._closed = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.threads = self.call(_configure_pool, requested)

    def call(self, fn, *args):
        """`fn(*args)` on the pool's thread; its exception is raised here. InputError once closed."""
        if self._closed:
            raise InputError("this engine was closed; load the package again")
        done = threading.Event()
        box: list = []
        self._jobs.put((fn, args, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Let the thread end (it is a daemon thread, so an unclosed one never blocks exit)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, box, done = job
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))
            done.set()


def _configure_pool(threads: int) -> int:
    """Size the calling thread's TVM pool to `threads` (capped at the CPUs allowed), before it
    exists; returns the count TVM reports."""
    import tvm.runtime  # noqa: F401  (registers the runtime's functions)
    import tvm_ffi

    cpus = allowed_cpus()
    cpus = (cpus * -(-threads // len(cpus)))[:threads] if threads > len(cpus) else cpus[:threads]
    tvm_ffi.get_global_func("runtime.config_threadpool")(_SHARE_CPUS, threads, [str(c) for c in cpus])
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())
