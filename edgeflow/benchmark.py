"""`edgeflow bench`: a package's network time against its peers, in one run.

    bench(package, *, vs=("onnxruntime", "torch"), threads=None, runs=10, warmup=2, spin=True) -> dict

The peers run the same network: a torch model rebuilt from the package (manifest model, its own
params.npz, so a `--weights random` package compares the same network) and its ONNX export
(`edgeflow.onnx_export`) in ONNX Runtime. All three get the same prepared input (a generated
pair at the package's input size) and the same thread count (torch.set_num_threads, ORT
intra_op_num_threads, the Engine's `threads`). Before timing, the first call of each is checked:
ORT must match torch to EPE 1e-3 px, the package must match torch within its precision's
tolerance, or nothing is timed. Then `runs` rounds, each calling every framework once in turn
(so a change of background load hits all alike); `ms` holds the medians of the network call
alone: `Engine.run_tensor` (input copy in, VM call, flow out), the torch forward, the ORT session
run. The Engine's pre/post-processing is timed apart, in the same rounds.

Thread pools spin: after a parallel region their idle workers keep polling for a while (TVM:
300000 yields, `TVM_THREAD_POOL_SPIN_COUNT`; ONNX Runtime: `session.intra_op.allow_spinning`;
torch: OpenMP's wait policy), which is what makes short kernels cheap, and what would steal a
core from the next engine timed. With `spin` (the default) every engine keeps its production
setting and each call is timed only once the process is idle again (its CPU time stops growing
while the bench sleeps: every pool has gone to sleep); `idle_wait_ms` says how long that took.
Without, no pool spins at all (TVM's spin count 0, ORT's spinning off), as in a process that
shares its cores. TVM reads its spin count once per process, when its first pool starts: one
process cannot time both ways. `effective_threads` (CPU time over wall time of each call) shows
the threads that ran; with spinning it counts workers polling between kernels too.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from edgeflow.errors import EdgeflowError, InputError, MissingDependency, PackageError
from edgeflow.metrics import epe_chw
from edgeflow.runtime.threads import check_threads

PEERS = ("onnxruntime", "torch")
TVM_DEFAULT_SPIN = 300000  # TVM's kDefaultSpinCount (src/runtime/thread_pool.cc): yields before sleeping
_TVM_SPIN: int | None = None  # the spin count TVM's pool took in this process, once a bench started one
ONNX_TOLERANCE = 1e-3  # px, mean EPE of the ONNX Runtime flow against the torch flow


class MismatchError(EdgeflowError):
    """A peer does not compute the package's network: timing it would compare different things."""


def bench(package: str | os.PathLike, *, vs=PEERS, threads: int | None = None, runs: int = 10,
          warmup: int = 2, spin: bool = True, progress=None) -> dict:
    """Median network ms of the package and of each peer in `vs`, and edgeflow/peer ratios.

    Returns {"ms": {"edgeflow", *vs}, "ratio": {peer: edgeflow ms / peer ms}, ...} with extra
    keys: model, input size, threads each framework reports, per-framework min/median/max and
    process CPU ms per call, the Engine's stages and end-to-end ms, EPE of each against torch.
    threads: default, the CPUs this process may use. spin: pools spin as in production, each call
    timed once the process is idle (see the module docstring); False: no pool spins. PackageError
    for a package this machine cannot run (a CUDA package here), MismatchError if a peer computes
    something else, InputError for a `spin` this process can no longer give TVM's pool.
    """
    import numpy as np

    from edgeflow.runtime.format import check_runnable, read_package
    from edgeflow.synth import generate_pair

    vs = _check_args(vs, runs, warmup, threads)
    threads = check_threads(threads)
    say = progress or (lambda msg: None)
    pkg = read_package(package, check_target=False)
    manifest, directory = pkg.manifest, pkg.directory
    target = manifest["target"]
    try:
        check_runnable(manifest)
    except PackageError as e:
        raise PackageError(f"bench needs the package's device: {e}; run it there, or `edgeflow inspect "
                           f"{package}` for a static prediction") from None
    device = "cuda" if target["kind"] == "cuda" else "cpu"
    h, w = int(manifest["input"]["height"]), int(manifest["input"]["width"])

    torch = _import("torch", "torch")
    torch_threads = torch.get_num_threads()
    tvm_spin = _tvm_spin_count(spin)
    try:
        torch.set_num_threads(threads)
        used = {"torch": torch.get_num_threads(), "onnxruntime": threads}
        say(f"torch    rebuild {manifest['model'].get('name')} from the package's parameters")
        model = model_from_package(manifest, directory).to(device)
        img1, img2, _ = generate_pair(np.random.default_rng(0), (h, w))
        from edgeflow.runtime.engine import Engine

        engine = Engine(manifest, directory, device, threads=threads)
        used["edgeflow"] = engine.threads
        x1, x2 = engine.prepare(img1), engine.prepare(img2)
        t1, t2 = (torch.from_numpy(x).to(device) for x in (x1, x2))

        def torch_call():
            with torch.inference_mode():
                return model(t1, t2)[0].cpu().numpy()  # .cpu() waits for a GPU

        calls = {"torch": torch_call}
        if "onnxruntime" in vs:
            say("onnx     export the torch model (correlation, warp decomposed) for ONNX Runtime")
            session = _ort_session(model.cpu(), (h, w), threads, device, spin)
            model.to(device)
            feed = {"img1": x1, "img2": x2}
            calls["onnxruntime"] = lambda: session.run(["flow"], feed)[0][0]
        calls["edgeflow"] = lambda: engine.run_tensor(x1, x2)

        say("check    the first call of each against torch")
        outputs = {name: np.asarray(call(), np.float32) for name, call in calls.items()}
        epe = {name: epe_chw(out, outputs["torch"]) for name, out in outputs.items() if name != "torch"}
        _check_same_network(manifest, epe)

        order = ["edgeflow", *vs]
        for _ in range(max(warmup - 1, 0)):
            for name in order:
                calls[name]()
        say(f"time     {runs} rounds of {', '.join(order)} ({threads} threads, "
            f"{'pools spin, each call timed once the process is idle' if spin else 'no pool spins'})")
        wall = {name: [] for name in order}
        cpu = {name: [] for name in order}
        idle = {name: [] for name in order}
        stages = {"prepare": [], "finish": []}
        for _ in range(runs):
            for name in order:
                if spin:
                    idle[name].append(wait_idle())
                c0, t0 = time.process_time(), time.perf_counter()
                calls[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            t0 = time.perf_counter()
            engine.prepare(img1)
            engine.prepare(img2)
            t_net = time.perf_counter()
            engine.finish(outputs["edgeflow"], img1.shape[:2])
            stages["prepare"].append(t_net - t0)
            stages["finish"].append(time.perf_counter() - t_net)
    finally:
        torch.set_num_threads(torch_threads)

    ms = {name: 1e3 * statistics.median(wall[name]) for name in order}
    end_to_end = [p + n + f for p, n, f in zip(stages["prepare"], wall["edgeflow"], stages["finish"])]
    return {
        "ms": {name: round(ms[name], 3) for name in ["edgeflow", *vs]},
        "ratio": {peer: round(ms["edgeflow"] / ms[peer], 4) for peer in vs},
        "model": manifest["model"].get("name"),
        "package": str(package),
        "target": target.get("name"),
        "device": device,
        "precision": manifest.get("precision"),
        "input_size": [h, w],
        "threads": {"requested": threads, **{name: used[name] for name in order}},
        "spin": spin,
        "tvm_spin_count": tvm_spin,
        # how long the process took to go idle before each engine's calls (pools still spinning)
        "idle_wait_ms": {name: _median_ms(v) for name, v in idle.items() if v},
        # CPU time over wall time of each engine's calls: the threads that really ran
        "effective_threads": {name: round(statistics.median(cpu[name]) / statistics.median(wall[name]), 2)
                              for name in order},
        "edgeflow_parallel_loops": _parallel_loops(Path(directory) / "lib" / "model.so"),
        "runs": runs,
        "warmup": max(warmup, 1),
        "stats": {name: {"min_ms": round(1e3 * min(wall[name]), 3), "median_ms": round(ms[name], 3),
                         "max_ms": round(1e3 * max(wall[name]), 3),
                         "cpu_ms": round(1e3 * statistics.median(cpu[name]), 3)} for name in order},
        "edgeflow_stages_ms": {"prepare": _median_ms(stages["prepare"]), "network": round(ms["edgeflow"], 3),
                               "finish": _median_ms(stages["finish"])},
        "edgeflow_end_to_end_ms": _median_ms(end_to_end),
        "epe_vs_torch": {name: round(v, 6) for name, v in epe.items()},
    }


def model_from_package(manifest: dict, directory: str | os.PathLike):
    """The torch model of a package: the manifest's stages and width, the channel counts of a
    pruned network (manifest "pruning"), the package's parameters.

    The package stores parameters as compiled (biases as [1,C,1,1], fp16 weights for fp16, the
    Winograd transform of wide 3x3 convolutions on CPUs): each is reshaped, cast or transformed back. The weight file named in the manifest, when present with the
    recorded sha256, supplies what is not a parameter (Caffe input means).
    """
    import numpy as np
    import torch

    from edgeflow.models import SPECS, create
    from edgeflow.models.stack import FlowNet2

    info = manifest["model"]
    name, weights = info.get("name"), info.get("weights")
    if name in SPECS and weights not in (None, "random", "module") and _weights_match(name, weights,
                                                                                       info.get("weights_sha256")):
        model = create(name, weights=weights)
    elif info.get("stages") and info.get("width"):
        model = FlowNet2(info["stages"], float(info["width"]))
    else:
        raise PackageError(f"cannot rebuild the torch model: the manifest names no stages and width ({info})")
    channels = (manifest.get("pruning") or {}).get("channels")
    if channels:  # a pruned network: its layers' channel counts
        from edgeflow.models.channels import set_channels

        set_channels(model, channels, "the manifest's pruning channels")
    own = model.state_dict()
    with np.load(Path(directory) / "params.npz", allow_pickle=False) as npz:
        stored = {n: npz[n] for n in manifest["params"]["order"] if n in own}
    for key, value in stored.items():  # Winograd weights [4, 4, C, F] of a 3x3 convolution [F, C, 3, 3]
        f, c = (own[key].shape[:2] if own[key].dim() == 4 else (None, None))
        if own[key].shape[2:] == (3, 3) and value.shape == (4, 4, c, f):
            from edgeflow.compile.cpu_schedules import winograd_weights_inverse

            stored[key] = winograd_weights_inverse(value)
    for key, value in own.items():
        if key not in stored or stored[key].size != value.numel():
            raise PackageError(f"cannot rebuild the torch model: params.npz has no parameter {key!r} "
                               f"{tuple(value.shape)} (the compiler transformed it)")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).reshape(own[k].shape)
                           for k, v in stored.items()})
    return model.eval()


def parse_vs(text: str) -> tuple[str, ...]:
    """'onnxruntime,torch' -> ("onnxruntime", "torch"); '' -> (); InputError for other names."""
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise InputError(f"vs={unknown[0]!r}: unknown peer; choices: {', '.join(PEERS)}")
    return names


def _check_args(vs, runs: int, warmup: int, threads: int | None) -> tuple[str, ...]:
    vs = parse_vs(vs) if isinstance(vs, str) else parse_vs(",".join(vs))
    if runs < 1:
        raise InputError(f"runs={runs}: expected at least 1")
    if warmup < 0:
        raise InputError(f"warmup={warmup}: expected 0 or more")
    check_threads(threads)
    return vs


def _check_same_network(manifest: dict, epe: dict) -> None:
    from edgeflow.compile import TOLERANCE

    if epe.get("onnxruntime", 0.0) > ONNX_TOLERANCE:
        raise MismatchError(f"the ONNX export differs from the torch model by EPE {epe['onnxruntime']:.4g} px "
                            f"(limit {ONNX_TOLERANCE} px): not timing a different network")
    accuracy = manifest.get("accuracy") or {}
    limit = 2 * max(TOLERANCE.get(manifest.get("precision"), 0.01), float(accuracy.get("epe_vs_torch") or 0))
    if epe["edgeflow"] > limit:
        raise MismatchError(f"the torch model rebuilt from the package differs from the package by EPE "
                            f"{epe['edgeflow']:.4g} px (limit {limit:.4g} px): not the same network")


def _tvm_spin_count(spin: bool) -> int:
    """The spin count TVM's pool workers use in this process: 0 without `spin`, TVM's own
    (TVM_THREAD_POOL_SPIN_COUNT, else 300000 yields) with it. TVM reads it once, when the first
    pool worker of the process starts: InputError when the environment or an earlier bench in this
    process fixed the other one. (A TVM pool that ran before any bench keeps what it read then.)"""
    global _TVM_SPIN
    count = int(os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", TVM_DEFAULT_SPIN if spin else 0))
    fixed = count if _TVM_SPIN is None else _TVM_SPIN
    if (fixed > 0) != spin:
        raise InputError(f"spin={spin}: TVM's pool in this process spins {fixed} times (TVM_THREAD_POOL_SPIN_COUNT, "
                         f"read once per process); run the bench in a new process")
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(fixed)
    _TVM_SPIN = fixed
    return fixed


def wait_idle(limit: float = 3.0, window: float = 0.02, quiet: int = 2) -> float:
    """Sleep until this process used under 5 % of a CPU in `quiet` consecutive `window`-second
    windows (every pool thread asleep), at most `limit` seconds; returns the seconds waited.
    Windows of 2 ms were too short: ONNX Runtime's spinning workers passed one as idle and then
    took a core from the next engine for its whole call (torch at 2 threads: 78 instead of 38 ms)."""
    start = time.perf_counter()
    calm = 0
    while calm < quiet:
        c0, t0 = time.process_time(), time.perf_counter()
        time.sleep(window)
        t1 = time.perf_counter()
        calm = calm + 1 if time.process_time() - c0 < 0.05 * (t1 - t0) else 0
        if t1 - start > limit:
            break
    return time.perf_counter() - start


def _ort_session(model, size, threads: int, device: str, spin: bool):
    ort = _import("onnxruntime", "onnxruntime")
    from edgeflow.onnx_export import export_onnx

    _import("onnxscript", "onnxscript")  # torch.onnx.export's dynamo exporter needs it
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        raise MissingDependency(f"this onnxruntime has no {providers[0]}; install onnxruntime-gpu")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # no warnings about nodes it cannot constant-fold
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(export_onnx(model, size), options, providers=providers)


def _parallel_loops(library: Path) -> bool:
    """Whether the compiled code has any loop run on TVM's thread pool; without one, TVM's thread
    count changes nothing (operators without a parallel schedule run on the calling thread)."""
    return b"TVMBackendParallelLaunch" in library.read_bytes()


def _weights_match(name: str, weights: str, sha: str | None) -> bool:
    from edgeflow.models.weights import resolve, sha256_file

    try:
        return sha is not None and sha256_file(resolve(name, weights)) == sha
    except (EdgeflowError, OSError):
        return False


def _median_ms(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 3)


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"bench needs {package}; install it with `pip install 'edgeflow[compile]'`") from None


def bench_remote(package: str | os.PathLike, *, rpc_tracker: str, rpc_key: str, runs: int = 10, warmup: int = 2,
                 session_timeout: float = 600, progress=None) -> dict:
    """Median network ms of a CPU package on a device registered with a TVM RPC tracker.

    The package's library is uploaded to a device the tracker hands out for `rpc_key`, loaded
    there into a Relax VM with the package's parameters, and its first output is checked against
    the torch model rebuilt from the package (here) before `runs` timed calls (TVM's
    time_evaluator on the device, after `warmup` untimed ones). The device runs with its own
    TVM thread pool (`TVM_NUM_THREADS` where its rpc_server starts). Returns {"ms": {"edgeflow"},
    "stats", "device", "epe_vs_torch", ...}. InputError when the tracker or key is not there,
    PackageError for a CUDA package or one the device cannot load.
    """
    import numpy as np

    from edgeflow.compile.tune import parse_tracker
    from edgeflow.runtime.format import read_package
    from edgeflow.runtime.preprocess import to_input
    from edgeflow.synth import generate_pair

    if runs < 1:
        raise InputError(f"runs={runs}: expected at least 1")
    if warmup < 0:
        raise InputError(f"warmup={warmup}: expected 0 or more")
    host, port = parse_tracker(rpc_tracker)
    say = progress or (lambda msg: None)
    pkg = read_package(package, check_target=False)
    manifest, directory = pkg.manifest, Path(pkg.directory)
    target = manifest["target"]
    if target.get("kind") != "cpu":
        raise PackageError(f"{package}: remote bench runs CPU packages; this one targets {target.get('name')} "
                           f"({target.get('kind')}): run `edgeflow bench` on the device itself")
    h, w = int(manifest["input"]["height"]), int(manifest["input"]["width"])
    import tvm
    from tvm import relax, rpc

    from edgeflow.compile.tune import free_devices

    free_devices(host, port, rpc_key)
    say(f"connect  tracker {host}:{port}, key {rpc_key}")
    try:
        remote = rpc.connect_tracker(host, port).request(rpc_key, priority=1, session_timeout=session_timeout)
    except Exception as e:  # noqa: BLE001 - socket and TVM errors alike: one line
        raise InputError(f"rpc_key={rpc_key!r}: no session from the tracker {host}:{port} "
                         f"({' '.join(str(e).split())[:200]})") from None
    say("upload   lib/model.so and the parameters")
    try:
        remote.upload(str(directory / "lib" / "model.so"), "model.so")
        lib = remote.load_module("model.so")
    except Exception as e:  # noqa: BLE001
        raise PackageError(f"{package}: the device could not load lib/model.so (built for "
                           f"{target.get('host_triple') or target.get('machine')}): {' '.join(str(e).split())[:200]}") \
            from None
    dev = remote.cpu()
    vm = relax.VirtualMachine(lib, dev)
    with np.load(directory / "params.npz", allow_pickle=False) as npz:
        params = [tvm.runtime.tensor(np.ascontiguousarray(npz[n]), dev) for n in manifest["params"]["order"]]
    img1, img2, _ = generate_pair(np.random.default_rng(0), (h, w))
    x1, x2 = to_input(img1), to_input(img2)
    vm.set_input("main", tvm.runtime.tensor(x1, dev), tvm.runtime.tensor(x2, dev), *params)

    say("check    the device's first call against torch")
    vm.invoke_stateful("main")
    out = vm.get_outputs("main")
    got = np.asarray((out[0] if not hasattr(out, "numpy") else out).numpy(), np.float32)
    torch = _import("torch", "torch")
    model = model_from_package(manifest, directory)
    with torch.inference_mode():
        want = model(torch.from_numpy(x1), torch.from_numpy(x2))[0].numpy()
    epe = {"edgeflow": epe_chw(got[0] if got.ndim == 4 else got, want)}
    _check_same_network(manifest, epe)

    say(f"time     {runs} calls on the device")
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=runs + warmup, min_repeat_ms=0)
    secs = list(timer("main").results)[warmup:]
    ms = 1e3 * statistics.median(secs)
    return {
        "ms": {"edgeflow": round(ms, 3)},
        "model": manifest["model"].get("name"),
        "package": str(package),
        "target": target.get("name"),
        "device": f"rpc key {rpc_key} at {host}:{port}",
        "precision": manifest.get("precision"),
        "input_size": [h, w],
        "runs": runs,
        "warmup": warmup,
        "stats": {"edgeflow": {"min_ms": round(1e3 * min(secs), 3), "median_ms": round(ms, 3),
                               "max_ms": round(1e3 * max(secs), 3)}},
        "epe_vs_torch": {k: round(v, 6) for k, v in epe.items()},
    }
