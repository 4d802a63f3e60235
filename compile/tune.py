"""MetaSchedule tuning of the kernels our hand schedules leave weak; databases `compile` applies.

    tune(model, *, target, input_size, db, trials=64, tasks="auto", rpc_tracker=None,
         rpc_key=None, progress=None) -> TuneResult
    open_database(db, *, model, target, input_size, precision) -> TuningDatabase  (for compile)

Tasks are the PrimFuncs of the module exactly as `lower.build` schedules it (`lower.fused`: our
convolution computes, Relax's fusion, the hand-scheduled correlation and warp already marked
scheduled). `tasks="auto"` tunes the convolutions whose register tile in `cpu_schedules.Conv`
fills less than half of the accumulator registers: the flow predictors and flow upsamplers (2
output channels: 2-8 of 28 accumulators, so each tap's 2 broadcasts and 1-4 vector loads feed
only 2-8 FMAs). Every other convolution gets a full tile (24 of 28) and the rest of the PrimFuncs are memory-bound copies (concatenate,
resize, mean), so the hand schedules keep them. `tasks="all"` tunes every unscheduled PrimFunc;
a comma-separated list of PrimFunc names tunes those.

Each task's hand schedule is measured too, by the same builder and runner, and `compile` applies
a tuned record only where it measured faster than the hand schedule: a database never makes a
package slower on the device it was measured on.

The database directory holds MetaSchedule's JSON database (`database_workload.json`,
`database_tuning_record.json`, appended as candidates are measured) and `edgeflow-tuning.json`
(model, input size, precision, target, per task: workload hash, trials done, best and hand ms),
rewritten atomically after every batch. A killed run loses at most the batch in flight; rerun
the same command and it continues with the trials each task still lacks. A database for another
model, size, precision or target is refused, by `tune` and by `compile`.

Builder: MetaSchedule's LocalBuilder starts a fresh process pool for every batch and its
default build function imports `tvm.s_tir.tensor_intrin`, ~40-50 s of TVMScript parsing on our
machines, so with its 30 s timeout every candidate fails to build. `WarmBuilder` keeps one pool
for the whole run (workers imported once, recycled after `RECYCLE` builds against the leak the
LocalBuilder works around) and builds without that import: a scheduled candidate has any tensor
intrinsic already inlined. Runner: a local one, or an `RPCRunner` on the devices registered
with a TVM RPC tracker under a key (`rpc_tracker="HOST:PORT", rpc_key=KEY`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeflow.errors import InputError, MissingDependency

META = "edgeflow-tuning.json"
META_VERSION = 1
RECYCLE = 256  # builds per worker process before it is replaced
BUILD_TIMEOUT_S = 30.0
OWN_FILES = ("tune.log", "tune.lock")  # may precede the database (`edgeflow tune --background`)


@dataclass
class TuneResult:
    """What `tune` did: the database directory, its metadata, and the tasks of this run."""

    db: Path
    meta: dict
    tuned: list = field(default_factory=list)  # names of the tasks measured in this run

    def summary(self) -> str:
        lines = [f"{self.db}: {self.meta['model']['name']} {'x'.join(map(str, self.meta['input_size']))} "
                 f"for {self.meta['target']['name']} ({len(self.meta['tasks'])} tasks)"]
        for name, t in self.meta["tasks"].items():
            best, hand = t.get("best_ms"), t.get("hand_ms")
            verdict = ("tuned faster" if best is not None and hand is not None and best < hand
                       else "hand schedule kept")
            lines.append(f"  {name:<44} {t['trials']:>4} trials  best {_ms(best)}  hand {_ms(hand)}  {verdict}")
        return "\n".join(lines)


def _ms(v) -> str:
    return f"{v:9.4f} ms" if v is not None else "        - ms"


def parse_tracker(text: str, flag: str = "rpc_tracker") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); InputError naming `flag` otherwise."""
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{flag}={text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


# --------------------------------------------------------------------------------------------
# the tasks


def model_info(model) -> dict:
    """{"name", "stages", "width"} of a registry name or a torch module: what a database is for."""
    if isinstance(model, str):
        from edgeflow.models import spec

        s = spec(model)
        return {"name": s.name, "stages": s.stages, "width": s.width}
    return {"name": type(model).__name__, "stages": getattr(model, "stages", None),
            "width": getattr(model, "width", None)}


def tuning_target(board, cores: int | None = None):
    """The TVM target candidates are built for: the board's, with `num-cores` (MetaSchedule's
    parallel loops need it) from `cores` where the board's target does not name it."""
    from tvm.target import Target

    spec = board.tvm_target_json()
    if cores is not None:
        spec = dict(spec, **{"num-cores": int(cores)})
    elif "num-cores" not in spec:
        raise InputError(f"target={board.name!r} does not say how many CPU cores the device has; give cores= "
                         f"(e.g. 6 for a Jetson Orin Nano)")
    return Target(spec)


def target_key(spec: dict) -> dict:
    """What must match between a database and a build: the target without its core count."""
    return {k: v for k, v in spec.items() if k != "num-cores"}


def workload(func):
    """The IRModule a task is tuned and looked up as: the PrimFunc without its name."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return _normalize_mod(func)


def workload_hash(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def weak_tile(func, target) -> bool:
    """True for a convolution whose `cpu_schedules.Conv` register tile fills less than half of
    the accumulator registers (few output channels)."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from edgeflow.compile import cpu_schedules

    lanes, registers = cpu_schedules._lanes_and_registers(target)
    out = ArgInfo.from_prim_func(func)[-1]
    f, v, _ = cpu_schedules.register_tile(int(out.shape[1]), int(out.shape[-1]), lanes, registers)
    return 2 * f * v < registers - 4


def select_tasks(mod, target, tasks: str = "auto") -> dict:
    """{name: PrimFunc} of the tasks to tune in the fused module `mod`: "auto", "all" (see the
    module docstring) or a comma-separated list of PrimFunc names."""
    from tvm import tirx

    candidates = {gv.name_hint: func for gv, func in mod.functions_items()
                  if isinstance(func, tirx.PrimFunc) and not (func.attrs is not None
                                                              and func.attrs.get("tirx.is_scheduled"))}
    if tasks == "all":
        return dict(sorted(candidates.items()))
    if tasks == "auto":
        return {n: f for n, f in sorted(candidates.items()) if "conv2d" in n and weak_tile(f, target)}
    names = [t.strip() for t in str(tasks).split(",") if t.strip()]
    unknown = [n for n in names if n not in candidates]
    if unknown or not names:
        raise InputError(f"tasks={tasks!r}: expected auto, all or names of this model's kernels "
                         f"({', '.join(sorted(candidates))})")
    return {n: candidates[n] for n in names}


def fused_module(torch_model, input_size, board, precision: str = "fp32"):
    """The Relax module of `torch_model` at `input_size` as `lower.build` schedules it for `board`."""
    from edgeflow.compile import frontend, lower

    with lower.TVM_LOCK:
        relax_model = frontend.to_relax(torch_model, tuple(input_size))
        mod, _params, _names = lower.prepare(relax_model.mod, relax_model.params, relax_model.param_names, precision)
        return lower.fused(mod, board)


# --------------------------------------------------------------------------------------------
# the database directory


def _meta_path(db: Path) -> Path:
    return Path(db) / META


def read_meta(db) -> dict | None:
    """The database's edgeflow-tuning.json, None when the directory has none."""
    path = _meta_path(Path(db))
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable tuning database description ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise InputError(f"{path}: unknown tuning database version (this edgeflow reads {META_VERSION})")
    return meta


def _write_meta(db: Path, meta: dict) -> None:
    path = _meta_path(db)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_meta(meta: dict, db, *, model: dict, target: dict, target_name: str, input_size, precision: str) -> None:
    """InputError (one line, naming the database) unless `meta` was tuned for this model, input
    size, precision and target."""
    want_size = [int(v) for v in input_size]
    have = meta.get("model", {})
    if (have.get("name"), have.get("stages"), have.get("width")) != (model["name"], model["stages"], model["width"]):
        raise InputError(f"tuning database {db} was tuned for model {have.get('name')}, not {model['name']}; "
                         f"tune {model['name']} into another directory")
    if meta.get("input_size") != want_size or meta.get("precision") != precision:
        raise InputError(f"tuning database {db} was tuned for {'x'.join(map(str, meta.get('input_size', [])))} "
                         f"{meta.get('precision')}, not {'x'.join(map(str, want_size))} {precision}")
    mt = meta.get("target", {})
    if mt.get("name") != target_name or target_key(mt.get("tvm_target", {})) != target_key(target):
        raise InputError(f"tuning database {db} was tuned for target {mt.get('name')} "
                         f"({_describe(mt.get('tvm_target', {}))}), not {target_name} ({_describe(target)})")


def _describe(spec: dict) -> str:
    return " ".join(str(spec.get(k)) for k in ("kind", "mtriple", "mcpu", "arch") if spec.get(k)) or "?"


def _json_database(db: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(db / "database_workload.json"),
                                    path_tuning_record=str(db / "database_tuning_record.json"),
                                    allow_missing=True, module_equality="structural")


@dataclass
class TuningDatabase:
    """A tuning database opened for one build: `apply(mod, target)` swaps in the tuned schedules
    that beat the hand ones; `used` lists what it applied (for the package manifest)."""

    path: Path
    meta: dict
    used: list = field(default_factory=list)
    rejected: list = field(default_factory=list)  # tuned schedules that computed something else

    def apply(self, mod, target):
        """`mod` with each PrimFunc whose workload has a record measured faster than its hand
        schedule replaced by the best tuned schedule (marked scheduled, so dlight skips it)."""
        from tvm import tirx

        db = _json_database(self.path)
        by_hash = {t["workload"]: (name, t) for name, t in self.meta.get("tasks", {}).items()}
        out = mod
        self.used, self.rejected = [], []
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
                continue
            key = workload(func)
            h = workload_hash(key)
            name, task = by_hash.get(h, (None, None))
            if task is None or task.get("best_ms") is None or task.get("hand_ms") is None \
                    or not task["best_ms"] < task["hand_ms"]:
                continue
            sch = db.query_schedule(key, target, "main")
            if sch is None:
                continue
            error = verify(key, sch.mod, target)
            if not error <= VERIFY_TOLERANCE:  # NaN too: it read outside its inputs or left outputs unwritten
                self.rejected.append({"function": gv.name_hint, "task": name, "workload": h,
                                      "max_error": None if error != error else float(f"{error:.3g}")})
                continue
            tuned = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if func.attrs is not None and "global_symbol" in func.attrs:
                tuned = tuned.with_attr("global_symbol", func.attrs["global_symbol"])
            else:
                tuned = tuned.without_attr("global_symbol")
            if out is mod:
                out = mod.clone()
            out[gv] = tuned
            self.used.append({"function": gv.name_hint, "task": name, "workload": h,
                              "tuned_ms": task["best_ms"], "hand_ms": task["hand_ms"]})
        return out

    def manifest_entry(self) -> dict:
        """The package manifest's `tuning`: the database's target, the sha256 of its records file
        as read, and per function the workload hash and the tuned and hand ms applied."""
        import hashlib

        records = self.path / "database_tuning_record.json"
        return {"database": self.path.name, "db_target": self.meta["target"], "tuned_with": self.meta.get("runner"),
                "records_sha256": hashlib.sha256(records.read_bytes()).hexdigest() if records.is_file() else None,
                "workloads": sorted(self.used, key=lambda u: u["function"]), "applied": len(self.used),
                "rejected": sorted(self.rejected, key=lambda u: u["function"]),
                "tasks_in_database": len(self.meta.get("tasks", {}))}


def verify(key, tuned, target, seed: int = 0) -> float:
    """Largest difference between the tuned module `tuned` and the hand schedule of the workload
    `key` on random inputs, relative to the largest hand output (NaN when the tuned one reads
    outside its inputs or leaves outputs unwritten). The last parameter is the output.
    MetaSchedule times candidates, it does not check them: the best record it found for
    flownet2-s's smallest flow upsampler at 384x512 computes something else (relative error 0.66)."""
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from edgeflow.compile import cpu_schedules

    rng = np.random.default_rng(seed)
    infos = ArgInfo.from_prim_func(key["main"])
    shapes = [([int(d) for d in a.shape], str(a.dtype)) for a in infos]
    inputs = [rng.standard_normal(shape).astype(dtype) for shape, dtype in shapes[:-1]]
    outs = []
    for m in (cpu_schedules.schedule(key, target), tuned):
        lib = tvm.compile(m, target=target)
        keep, args = zip(*[_guarded(x) for x in inputs + [np.full(shapes[-1][0], np.nan, shapes[-1][1])]])
        lib["main"](*args)
        outs.append(np.array(args[-1].numpy()))
        del keep
    want, got = outs
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


VERIFY_TOLERANCE = 1e-4
_GUARD = 4096  # elements of NaN on each side of a verification buffer


def _guarded(x):
    """(owner, TVM tensor) of `x`'s values placed, 64-byte aligned, inside a NaN-filled buffer:
    reads past the tensor's ends return NaN instead of whatever the heap holds."""
    import numpy as np
    import tvm

    raw = np.full(x.size + 2 * _GUARD + 16, np.nan, x.dtype)
    start = _GUARD + (-(raw.ctypes.data // raw.itemsize + _GUARD)) % (64 // raw.itemsize)
    view = raw[start:start + x.size].reshape(x.shape)
    view[...] = x
    return raw, tvm.runtime.from_dlpack(view)


def open_database(db, *, model, target: str, input_size, precision: str = "fp32") -> TuningDatabase:
    """The tuning database at `db` for a build of `model` (registry name, module or info dict)
    for `target`; InputError (one line) if it is missing or tuned for something else."""
    from edgeflow import targets

    db = Path(db)
    meta = read_meta(db) if db.is_dir() else None
    if meta is None:
        raise InputError(f"tuning_db={str(db)!r}: not a tuning database (no {META}; create one with `edgeflow tune`)")
    board = targets.get(target)
    info = model if isinstance(model, dict) else model_info(model)
    check_meta(meta, db, model=info, target=board.tvm_target_json(), target_name=board.name,
               input_size=input_size, precision=precision)
    return TuningDatabase(db, meta)


# --------------------------------------------------------------------------------------------
# builder and runner


def _warm_worker() -> None:
    """Popen worker initializer: the imports a build needs, once per worker process."""
    import tvm  # noqa: F401
    import tvm_ffi
    from tvm.s_tir.meta_schedule.builder import local_builder  # noqa: F401

    tvm_ffi.register_global_func("edgeflow.tune.build", build_candidate, override=True)


def build_candidate(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin` (40-50 s)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def warm_builder(max_workers: int | None = None, timeout_sec: float = BUILD_TIMEOUT_S):
    """A MetaSchedule builder whose worker processes start once and build without the
    tensor-intrinsic import (see the module docstring). Call `.shutdown()` when done."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class WarmBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers or os.cpu_count() or 1, timeout=timeout_sec,
                                          initializer=_warm_worker, maximum_process_uses=RECYCLE)

        def build(self, build_inputs):
            results = []
            jobs = [("edgeflow.tune.build", None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"WarmBuilder: timeout, killed after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"WarmBuilder: {r.value}"))
            return results

        def shutdown(self):
            self.pool.shutdown()

    return WarmBuilder()


def _set_threads(threads: int) -> None:
    """Runner worker initializer: TVM's pool there gets `threads` threads (it reads the variable
    when the pool starts; left alone it takes half the logical CPUs, one on a 2-core machine)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)


def _runner(rpc_tracker: str | None, rpc_key: str | None, threads: int, number: int = 3, repeat: int = 3):
    """(runner, description): a local runner whose kernels run on `threads` threads (the
    target's cores, as the Engine runs them), or an RPCRunner over the tracker's devices (their
    thread pools are theirs: TVM_NUM_THREADS where rpc_server starts)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=0, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        return (ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator,
                                      initializer=functools.partial(_set_threads, threads)),
                f"local, {threads} threads")
    host, port = parse_tracker(rpc_tracker)
    devices = free_devices(host, port, rpc_key)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key, session_timeout_sec=120)
    return (ms.runner.RPCRunner(config, evaluator, max_workers=devices),
            f"rpc key {rpc_key} at {host}:{port} ({devices} devices)")


def free_devices(host: str, port: int, key: str | None) -> int:
    """How many devices are registered with the tracker under `key`; InputError (one line) when
    the tracker cannot be reached or none is."""
    import socket

    from tvm import rpc

    if not key:
        raise InputError("rpc_key: give the key the devices registered with (rpc_server --key)")
    try:
        socket.create_connection((host, port), timeout=10).close()  # TVM retries a refused one for 60 s
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as e:  # noqa: BLE001 - socket errors, TVMError: one line either way
        raise InputError(f"rpc_tracker={host}:{port}: cannot reach the tracker ({' '.join(str(e).split())[:200]})") \
            from None
    info = summary.get("queue_info", {}).get(key)
    count = (info or {}).get("free", 0) + (info or {}).get("pending", 0)
    if not info or not count:
        keys = ", ".join(sorted(summary.get("queue_info", {}))) or "none"
        raise InputError(f"rpc_key={key!r}: no device is registered with the tracker {host}:{port} under it "
                         f"(keys there: {keys})")
    return max(1, int(info.get("free", 1)))


# --------------------------------------------------------------------------------------------
# tuning


def tune(model="flownet2-s", *, target: str, input_size=(384, 512), db, trials: int = 64, tasks: str = "auto",
         precision: str = "fp32", rpc_tracker: str | None = None, rpc_key: str | None = None,
         cores: int | None = None, progress: Callable[[str], None] | None = None) -> TuneResult:
    """Tune the tasks of `model` at `input_size` for the CPU `target` into the database
    directory `db`, up to `trials` candidates per task (resuming what `db` already holds).

    tasks: "auto" (the convolutions the hand schedules cover badly), "all", or PrimFunc names
    separated by commas (an unknown name is refused with the list). rpc_tracker,
    rpc_key: measure on the devices registered with that TVM RPC tracker under that key (a
    Jetson's CPU, another host) instead of this machine. cores: the device's CPU cores, for
    boards whose target does not name them. InputError for a database tuned for something else.
    """
    from edgeflow import targets
    from edgeflow.compile import frontend

    say = progress or (lambda msg: None)
    board = targets.get(target)
    if board.is_cuda:
        raise InputError(f"target={board.name!r}: tuning covers CPU targets (host, aarch64-cpu); the Jetson GPU "
                         f"kernels keep their hand and dlight schedules")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"trials={trials!r}: expected a positive integer")
    if (rpc_tracker is None) != (rpc_key is None):
        raise InputError("rpc_tracker and rpc_key: give both (the tracker's HOST:PORT and the devices' key) or neither")
    if rpc_tracker is None and board.cross_compiled:
        raise InputError(f"target={board.name!r}: this machine cannot run its code; measure on the device with "
                         f"rpc_tracker= and rpc_key=")
    if precision != "fp32":
        raise InputError(f"precision={precision!r}: tuning covers fp32 (the CPU packages' precision)")
    frontend.check_size(input_size)
    _import_meta_schedule()
    if rpc_tracker is not None:  # before minutes of work
        free_devices(*parse_tracker(rpc_tracker), rpc_key)
    db = Path(db)
    info = model_info(model)
    tvm_target = tuning_target(board, cores)
    target_spec = dict(board.tvm_target_json(), **({"num-cores": int(cores)} if cores is not None else {}))
    meta = read_meta(db) if db.is_dir() else None
    if meta is not None:
        check_meta(meta, db, model=info, target=target_spec, target_name=board.name, input_size=input_size,
                   precision=precision)
    elif db.exists() and (not db.is_dir() or any(p.name not in OWN_FILES for p in db.iterdir())):
        raise InputError(f"db={str(db)!r}: exists and is not a tuning database; give a new or empty directory")
    db.mkdir(parents=True, exist_ok=True)
    lock = _lock(db)
    try:
        _repair(db)
        return _tune_locked(db, meta, info, board, tvm_target, target_spec, model, input_size, precision, tasks,
                            trials, rpc_tracker, rpc_key, say)
    finally:
        os.close(lock)


def _tune_locked(db, meta, info, board, tvm_target, target_spec, model, input_size, precision, tasks, trials,
                 rpc_tracker, rpc_key, say) -> TuneResult:
    import time

    from edgeflow.compile import lower

    meta = meta or {"version": META_VERSION, "model": info, "input_size": [int(v) for v in input_size],
                    "precision": precision, "target": {"name": board.name, "tvm_target": target_spec},
                    "tasks": {}}

    say(f"tasks    {info['name']} at {input_size[0]}x{input_size[1]} for {board.name} ({tasks})")
    if isinstance(model, str):  # kernels depend on shapes, not on weights
        from edgeflow.models import create

        model = create(model, weights=None)
    mod = fused_module(model, input_size, board, precision)
    chosen = select_tasks(mod, tvm_target, tasks)
    runner, runner_text = _runner(rpc_tracker, rpc_key, int(tvm_target.attrs["num-cores"]))
    meta["runner"] = runner_text
    for name, func in chosen.items():
        key = workload(func)
        entry = meta["tasks"].setdefault(name, {"workload": workload_hash(key), "trials": 0, "best_ms": None,
                                                "hand_ms": None})
        entry["workload"] = workload_hash(key)
    _write_meta(db, meta)

    builder = warm_builder()
    tuned = []
    try:
        with lower.TVM_LOCK, cpu_intrinsics_only(tvm_target):
            for i, (name, func) in enumerate(chosen.items(), 1):
                entry = meta["tasks"][name]
                left = trials - entry["trials"]
                key = workload(func)
                if entry["hand_ms"] is None:
                    entry["hand_ms"], why = _measure_hand(func, tvm_target, builder, runner)
                    if why:
                        say(f"task {i}/{len(chosen)} {name}: the hand schedule did not run ({why})")
                    _write_meta(db, meta)
                if left <= 0:
                    say(f"task {i}/{len(chosen)} {name}: {entry['trials']} trials done, best {_ms(entry['best_ms'])}")
                    continue
                say(f"task {i}/{len(chosen)} {name}: {entry['trials']}/{trials} trials done, hand schedule "
                    f"{_ms(entry['hand_ms'])}; tuning {left} more")
                t0 = time.time()
                _tune_one(key, name, tvm_target, left, db, builder, runner, entry, meta,
                          lambda msg, i=i: say(f"task {i}/{len(chosen)} {msg}"))
                tuned.append(name)
                say(f"task {i}/{len(chosen)} {name}: best {_ms(entry['best_ms'])} vs hand {_ms(entry['hand_ms'])} "
                    f"({time.time() - t0:.0f} s)")
    finally:
        builder.shutdown()
        runner.pool.shutdown()
    return TuneResult(db, meta, tuned)


def _lock(db: Path) -> int:
    """An exclusive lock on DB/tune.lock for this process (released when it exits, killed too);
    InputError when another tuner holds it."""
    import fcntl

    fd = os.open(db / "tune.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InputError(f"db={str(db)!r}: another edgeflow tune (pid {pid}) is tuning it; wait for it or stop "
                         f"it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@contextmanager
def cpu_intrinsics_only(target):
    """Within the block, `import tvm.s_tir.tensor_intrin` (MetaSchedule's TuneContext does it)
    finds only the intrinsics of `target`'s CPU registered: x86 (0.3 s of CPU) or Arm (2.6 s)
    instead of every one TVM has, whose CUDA part alone takes 18 s (40-50 s on a busy machine).
    MetaSchedule's CPU rules name the x86 dot-product intrinsics, so these must be there. After
    the block a plain import loads the rest as usual (the CPU modules stay imported)."""
    import importlib
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:  # the real package is loaded: every intrinsic is registered
        yield
        return
    import tvm.s_tir

    stub = types.ModuleType(name)
    stub.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    triple = str(target.attrs.get("mtriple", "")) or os.uname().machine
    sys.modules[name] = stub
    try:
        importlib.import_module(f"{name}.{'arm_cpu' if triple.startswith(('aarch64', 'arm')) else 'x86'}")
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


def _import_meta_schedule():
    try:
        import cloudpickle  # noqa: F401 - MetaSchedule's process pools pickle with it
        import psutil  # noqa: F401
        import xgboost  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"tuning needs {e.name}; install it with `pip install 'edgeflow[compile]'`") from None


def _measure_hand(func, target, builder, runner) -> tuple[float | None, str]:
    """(ms, "") of `func` under the hand schedules (`cpu_schedules.schedule`), built and run like
    a candidate; (None, why) if it does not build or run."""
    from tvm.s_tir import meta_schedule as ms

    from edgeflow.compile import cpu_schedules

    mod = cpu_schedules.schedule(workload(func), target)
    built = builder.build([ms.builder.BuilderInput(mod, target)])[0]
    if built.error_msg:
        return None, _first_line(built.error_msg)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    ran = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])[0].result()
    if ran.error_msg:
        return None, _first_line(ran.error_msg)
    return round(1e3 * min(float(s) for s in ran.run_secs), 6), ""


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:200]


def batch_size(trials: int) -> int:
    """Candidates measured per batch: at most 32 (what a kill can lose), at least 2, and half the
    trials asked for, so that even a short run saves progress before it ends."""
    return max(2, min(32, trials // 2))


def _repair(db: Path) -> None:
    """Drop a last line a kill cut short from the JSON database files (MetaSchedule appends a
    line per record and refuses to load a file with a broken one)."""
    for name in ("database_workload.json", "database_tuning_record.json"):
        path = db / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        good = []
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                continue
            good.append(line)
        if len(good) != len(lines) or (lines and not path.read_text().endswith("\n")):
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in good))
            os.replace(tmp, path)


def _tune_one(key, name, target, trials, db, builder, runner, entry, meta, say) -> None:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    database = _json_database(db)

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            ok = [min(float(s) for s in r.run_secs) for r in runner_results if r.run_secs and not r.error_msg]
            failed = len(runner_results) - len(ok)
            entry["trials"] += len(runner_results)
            if ok:
                best = round(1e3 * min(ok), 6)
                entry["best_ms"] = best if entry["best_ms"] is None else min(entry["best_ms"], best)
            _write_meta(db, meta)
            say(f"{name}: {entry['trials']} trials, best {_ms(entry['best_ms'])}"
                + (f", {failed} failed" if failed else ""))

    # MetaSchedule's population of 512 costs minutes of search per batch on 2 busy cores; a few
    # times the trials asked for keeps the search proportionate (512 from 64 trials up).
    strategy = ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 8 * trials)),
                                                     init_min_unmeasured=min(50, max(8, trials)))
    ctx = ms.TuneContext(mod=key, target=target, space_generator="post-order-apply", search_strategy=strategy,
                         task_name=name, num_threads="physical")
    ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(db / "logs"), max_trials_global=trials,
                  max_trials_per_task=trials, num_trials_per_iter=batch_size(trials), builder=builder, runner=runner,
                  database=database, measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                                        Progress()],
                  task_scheduler="round-robin")
