"""Pipeline fps against network fps, in one run, on one package and one clip, for each CPU
thread configuration of the network; the daemon's network fps under MJPEG viewers.

    python bench/pipeline.py [PACKAGE] [--size 256x320] [--frames 60] [--clip-size 480x640]
                             [--clip-format png,jpg,bmp] [--threads all,all-1] [--rounds 3]
                             [--viewers 0,1,20] [--preview-fps 15,0] [--seconds 10] [--stuck-seconds 40] [--json]

Without PACKAGE, flownet2-s with random weights (speed does not depend on them) is compiled for
the host at --size into out/bench/. The clip (generated, --clip-size, written as PNG, JPEG and/or
BMP files: lossless, what an MJPEG camera sends, uncompressed as a CSI camera delivers) is
streamed from disk: "network" is `engine.run_tensor` alone, pair after pair on prepared inputs;
"pipeline" is `engine.stream(file source)` end to end (decoding, preprocessing, network,
postprocessing in their threads); "sequential" the same stages one after another in one thread,
for reference. The ratio pipeline / network is what the pipelining keeps of the network's speed
(1.0: nothing lost). All are measured in turn, --rounds times, and the medians reported, so that
a change in the machine's load hits them alike (the load average is printed beside them).

--threads: the network's CPU threads, one Engine per value: "all" (every physical core, the
Engine's default) and "all-1" (one core left to capture and pre/postprocessing), or numbers. Each
configuration's pipeline is compared with its own network alone and with the network on every
core. CPU milliseconds per flow field are reported per stage (thread CPU time: it holds under
load, unlike fps): where the pipeline's CPU goes besides the network; the network's CPU alone
over all of them is what the pipeline can keep of the network where the network alone already
fills every core. (Under other load, the wall-clock ratios favour the pipeline: its extra
threads win the machine a larger share of the CPU.) With PACKAGE given, torch is kept out of the
process, as on the device.

With --viewers, the daemon (`edgeflow.runtime.serve`) runs in this process over the looping clip
(the first clip format, the first thread configuration) and N MJPEG clients read /stream.mjpg on
loopback, for each --preview-fps (the daemon's cap on preview encodings; 0: one per flow field);
its network fps (from /status) and the CPU of its threads are reported per N (the clients run in
another process), and one client that never reads is added to show the daemon's memory (RSS)
stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

FORMATS = ("png", "jpg", "bmp")


def compile_package(size: tuple[int, int]) -> Path:
    out = Path("out/bench") / f"flownet2-s-host-{size[0]}x{size[1]}.tar"
    if not out.exists():
        import torch

        from edgeflow.compile import compile
        from edgeflow.models import create

        torch.manual_seed(0)
        out.parent.mkdir(parents=True, exist_ok=True)
        compile(create("flownet2-s", weights=None), target="host", input_size=size, out=out)
    return out


def write_clips(directory: Path, count: int, size: tuple[int, int], formats: list[str]) -> list[np.ndarray]:
    """The generated clip, written once per format into directory/FORMAT/; its frames."""
    from edgeflow.synth import video_frames

    frames = [img for img, _ in video_frames(np.random.default_rng(0), count, size, photometric=False)]
    for fmt in formats:
        (directory / fmt).mkdir()
        for i, img in enumerate(frames):
            cv2.imwrite(str(directory / fmt / f"{i:05d}.{fmt}"), img)
    return frames


def network_fps(engine, frames: list[np.ndarray]) -> tuple[float, float]:
    """(fps, CPU ms per pair) of the network alone on prepared inputs."""
    xs = [engine.prepare(f) for f in frames]
    engine.run_tensor(xs[0], xs[1])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for a, b in zip(xs, xs[1:]):
        engine.run_tensor(a, b)
    pairs = len(xs) - 1
    return pairs / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / pairs


def sequential_fps(engine, directory: Path) -> float:
    from edgeflow.runtime.sources import open_source

    t0 = time.perf_counter()
    prev, n = None, 0
    for frame in open_source(str(directory)):
        x = engine.prepare(frame)
        if prev is not None:
            engine.finish(engine.run_tensor(prev, x), frame.shape[:2])
            n += 1
        prev = x
    return n / (time.perf_counter() - t0)


def pipeline_fps(engine, directory: Path) -> tuple[float, dict, dict]:
    """(fps, stage means in ms, CPU ms per flow field by where it went)."""
    t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
    stream = engine.stream(str(directory))
    stats = stream.run()
    wall, cpu, caller = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
    per = 1e3 / stats.count
    where = {f"{k} thread": v * per for k, v in stream.stage_cpu_s.items()}
    where["results (caller)"] = caller * per
    where["network (Engine thread + TVM pool)"] = (cpu - caller - sum(stream.stage_cpu_s.values())) * per
    return stats.count / wall, stats.summary(), where


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def thread_ticks() -> dict[int, int]:
    """CPU clock ticks (user + system) of each thread of this process, by thread id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def role(name: str | None) -> str:
    """Where a thread's CPU goes in the daemon, by the thread's name (None: not a Python thread)."""
    if name is None or name == "edgeflow-engine":
        return "network (Engine thread + TVM pool)"
    if name.startswith("edgeflow-"):
        return name[len("edgeflow-"):] + (" thread" if name != "edgeflow-daemon" else " (publishing results)")
    if name.startswith("asyncio_"):
        return "preview encoding (executor)"
    if name == "bench-server":
        return "HTTP (event loop)"
    return "benchmark and other"


def cpu_by_role(before: dict[int, int], after: dict[int, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second of each role between two `thread_ticks()` samples."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid, ticks in after.items():
        r = role(names.get(tid))
        out[r] = out.get(r, 0.0) + (ticks - before.get(tid, 0)) / hz / seconds
    return dict(sorted(out.items()))


def daemon_under_viewers(engine, package: Path, directory: Path, counts: list[int], seconds: float,
                         rounds: int, stuck_seconds: float, preview_fps: float) -> dict:
    """The daemon's network fps with each number of MJPEG viewers (counts taken in turn, `rounds`
    times, medians, `seconds` each), the CPU of its threads meanwhile, and its RSS and the bytes
    waiting in viewers' transports over `stuck_seconds` without, then with, a viewer that never
    reads (long enough to fill the kernel's socket buffers, after which only awaited writes keep
    the daemon's memory flat)."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from edgeflow.runtime.serve.daemon import Settings

    url = {}
    ready = threading.Event()
    settings = Settings.load(package=str(package), source=str(directory), loop=True, port=0, preview_fps=preview_fps)
    server = threading.Thread(target=_serve_in_thread, args=(settings, engine, url, ready), name="bench-server",
                              daemon=True)
    server.start()
    ready.wait(60)
    base = url["url"]
    samples: dict[int, list[float]] = {n: [] for n in counts}
    client_cpu_s: dict[int, float] = dict.fromkeys(counts, 0.0)  # CPU seconds the viewers' process used
    cpu: dict[int, list[dict]] = {n: [] for n in counts}
    encoded: dict[int, list[float]] = {n: [] for n in counts}

    def status() -> dict:
        with urllib.request.urlopen(base + "status", timeout=10) as r:
            return json.loads(r.read())

    for _ in range(rounds):
        for n in counts:
            clients = subprocess.Popen([sys.executable, "-c", VIEWERS, base + "stream.mjpg", str(n)]) if n else None
            time.sleep(seconds / 2)  # the status window fills with results under this load
            ticks, t0, s0 = thread_ticks(), time.monotonic(), status()
            for _ in range(5):
                time.sleep(seconds / 10)
                samples[n].append(status()["fps"]["network"])
            window = time.monotonic() - t0
            cpu[n].append(cpu_by_role(ticks, thread_ticks(), window))
            encoded[n].append((status()["previews_encoded"] - s0["previews_encoded"]) / window)
            if clients is not None:
                clients.terminate()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                clients.wait()
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                client_cpu_s[n] += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out = {"preview_fps": preview_fps,
           "network_fps_by_viewers": {n: float(np.median(v)) for n, v in samples.items()},
           "previews_encoded_per_s": {n: float(np.median(v)) for n, v in encoded.items()},
           "cpu_s_per_s_by_viewers": {n: {k: float(np.median([c.get(k, 0.0) for c in cs])) for k in cs[0]}
                                      for n, cs in cpu.items()},
           "viewer_process_cpu_s_per_s": {n: client_cpu_s[n] / (rounds * seconds) for n in counts}}
    rss = {}
    for label in ("without", "with") if stuck_seconds > 0 else ():
        stuck = None
        if label == "with":
            where = urlsplit(base)
            stuck = socket.create_connection((where.hostname, where.port))
            stuck.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        before, frames, buffered = rss_mb(), status()["frames"], 0
        deadline = time.monotonic() + stuck_seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)
            buffered = max(buffered, status()["mjpeg_buffered_bytes"])
        rss[label] = {"rss_mb_before": before, "rss_mb_after": rss_mb(), "flow_fields": status()["frames"] - frames,
                      "max_buffered_bytes": buffered}
        if stuck is not None:
            stuck.close()
    out["stuck_viewer"] = rss
    url["loop"].call_soon_threadsafe(url["stop"].set)
    server.join(10)
    return out


# N threads each reading an MJPEG stream as fast as it comes (argv: URL, N).
VIEWERS = """
import sys, threading, urllib.request
def read():
    with urllib.request.urlopen(sys.argv[1], timeout=30) as r:
        while r.read(1 << 20):
            pass
threads = [threading.Thread(target=read) for _ in range(int(sys.argv[2]))]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def _serve_in_thread(settings, engine, url, ready) -> None:
    """`serve()` installs signal handlers, which only the main thread may: its pieces, run here."""
    import asyncio

    from aiohttp import web

    from edgeflow.runtime.serve.app import make_app
    from edgeflow.runtime.serve.daemon import Daemon

    async def main():
        daemon = Daemon(settings, engine)
        app = make_app(daemon)
        runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        url["loop"], url["stop"] = asyncio.get_running_loop(), asyncio.Event()
        daemon.start()
        ready.set()
        await url["stop"].wait()
        app["hub"].close()
        daemon.stop()
        await runner.cleanup()

    asyncio.run(main())


def thread_counts(spec: str) -> list[int]:
    """--threads "all,all-1,3" -> [cores, cores - 1, 3] (at least 1 each, duplicates dropped)."""
    from edgeflow.runtime.threads import physical_cores

    cores, out = physical_cores(), []
    for token in spec.split(","):
        token = token.strip()
        n = cores if token == "all" else cores - 1 if token == "all-1" else int(token)
        if max(n, 1) not in out:
            out.append(max(n, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?")
    parser.add_argument("--size", default="256x320", help="compiled size when no package is given")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--clip-size", default="480x640")
    parser.add_argument("--clip-format", default="png,jpg,bmp", help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--threads", default="all,all-1", help="network CPU threads per configuration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--viewers", default="", help="e.g. 0,20: MJPEG clients on the daemon")
    parser.add_argument("--preview-fps", default="15", help="the daemon's preview caps to run, e.g. 15,0")
    parser.add_argument("--seconds", type=float, default=10.0, help="per viewer count")
    parser.add_argument("--stuck-seconds", type=float, default=40.0, help="0: skip the stuck viewer")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    formats = args.clip_format.split(",")
    if not set(formats) <= set(FORMATS):
        parser.error(f"--clip-format {args.clip_format}: expected some of {', '.join(FORMATS)}")
    os.environ.setdefault("EDGEFLOW_CACHE", tempfile.mkdtemp(prefix="edgeflow-bench-"))
    if args.package and "torch" not in sys.modules:  # as on the device (tvm_ffi imports torch where installed)
        sys.modules["torch"] = None

    from edgeflow.runtime import load

    size = tuple(int(v) for v in args.size.split("x"))
    clip_size = tuple(int(v) for v in args.clip_size.split("x"))
    package = Path(args.package) if args.package else compile_package(size)
    engines = {n: load(package, threads=n) for n in thread_counts(args.threads)}
    first = next(iter(engines.values()))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        frames = write_clips(Path(d), args.frames, clip_size, formats)
        nets = {n: [] for n in engines}
        runs = {(n, fmt): {"sequential": [], "pipeline": [], "cpu": []} for n in engines for fmt in formats}
        for _ in range(args.rounds):
            for n, engine in engines.items():
                nets[n].append(network_fps(engine, frames))
                for fmt in formats:
                    r = runs[n, fmt]
                    r["sequential"].append(sequential_fps(engine, Path(d) / fmt))
                    fps, summary, where = pipeline_fps(engine, Path(d) / fmt)
                    r["pipeline"].append(fps)
                    r["cpu"].append(where)
                    r["stage_ms"] = {k: summary[k] for k in ("capture", "preprocess", "network", "postprocess")}
        all_cores = max(engines)
        net_all = float(np.median([fps for fps, _ in nets[all_cores]]))
        configs = []
        for (n, fmt), r in runs.items():
            net = float(np.median([fps for fps, _ in nets[n]]))
            seq, pipe = float(np.median(r["sequential"])), float(np.median(r["pipeline"]))
            configs.append({
                "threads": n, "clip_format": fmt, "network_fps": net,
                "network_cpu_ms_per_pair": float(np.median([c for _, c in nets[n]])),
                "sequential_fps": seq, "pipeline_fps": pipe, "pipeline_over_network": pipe / net,
                "sequential_over_network": seq / net, "pipeline_over_network_all_cores": pipe / net_all,
                # What the pipeline can keep of the network where the network alone fills every core:
                # the network's CPU alone over all the CPU the pipeline spends per flow field.
                "cpu_bound_over_network": float(np.median([c for _, c in nets[n]]))
                / float(np.median([sum(c.values()) for c in r["cpu"]])),
                "pipeline_stage_ms": r["stage_ms"],
                "pipeline_cpu_ms_per_flow_field": {k: float(np.median([c[k] for c in r["cpu"]])) for k in r["cpu"][0]}})
        result = {"package": str(package), "input": f"{first.height}x{first.width}",
                  "clip": f"{args.frames} frames {clip_size[0]}x{clip_size[1]}", "cpus": os.cpu_count(),
                  "load_average": [load_before, os.getloadavg()[0]], "rounds": args.rounds, "configs": configs}
        if args.viewers:
            counts = [int(n) for n in args.viewers.split(",")]
            result["daemon"] = [daemon_under_viewers(first, package, Path(d) / formats[0], counts, args.seconds,
                                                     args.rounds, args.stuck_seconds, float(cap))
                                for cap in args.preview_fps.split(",")]
            result["load_average"].append(os.getloadavg()[0])
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    report(result, args)


def report(result: dict, args) -> None:
    print(f"{result['package']} ({result['input']}), {result['clip']}, {result['cpus']} CPUs, load average "
          + " -> ".join(f"{v:.1f}" for v in result["load_average"]) + f", medians of {args.rounds} rounds")
    for c in result["configs"]:
        cpu = c["pipeline_cpu_ms_per_flow_field"]
        print(f"network on {c['threads']} thread(s), {c['clip_format']} clip: network {c['network_fps']:.2f} fps "
              f"({c['network_cpu_ms_per_pair']:.1f} CPU ms a pair), sequential {c['sequential_fps']:.2f} "
              f"({c['sequential_over_network']:.2f}), pipeline {c['pipeline_fps']:.2f} fps "
              f"({c['pipeline_over_network']:.2f} of its network, {c['pipeline_over_network_all_cores']:.2f} of the "
              "network on every core)")
        print("    pipeline CPU ms per flow field: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
              + f"; network CPU alone / pipeline CPU {c['cpu_bound_over_network']:.2f}")
    for daemon in result.get("daemon", []):
        by = daemon["network_fps_by_viewers"]
        cap = daemon["preview_fps"]
        for n, fps in by.items():
            cpu = daemon["cpu_s_per_s_by_viewers"][n]
            print(f"daemon (preview cap {cap:g} fps), {n:3d} MJPEG viewers: network {fps:6.2f} fps "
                  f"({fps / by[min(by)]:.2f} of {min(by)} viewers), {daemon['previews_encoded_per_s'][n]:.1f} "
                  f"previews encoded/s; the viewers' process used {daemon['viewer_process_cpu_s_per_s'][n]:.2f} "
                  "CPU s/s")
            print("    daemon CPU s/s: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items() if v > 0))
        for label, r in daemon["stuck_viewer"].items():
            print(f"daemon, {label} a viewer that never reads, {args.stuck_seconds:.0f} s: "
                  f"RSS {r['rss_mb_before']:.0f} -> "
                  f"{r['rss_mb_after']:.0f} MB, {r['flow_fields']} flow fields, at most {r['max_buffered_bytes']} "
                  "bytes waiting in the viewers' transports")


if __name__ == "__main__":
    main()
