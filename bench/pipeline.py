"""Pipeline fps against network fps, in one run, on one package and one clip.

    python bench/pipeline.py [PACKAGE] [--size 256x320] [--frames 60] [--clip-size 480x640] [--rounds 3]
                             [--viewers 0,20] [--seconds 10] [--stuck-seconds 40] [--json]

Without PACKAGE, flownet2-s with random weights (speed does not depend on them) is compiled for
the host at --size into out/bench/. The clip (generated, PNG, --clip-size) is streamed from disk:
"network" is `engine.run_tensor` alone, pair after pair on prepared inputs; "pipeline" is
`engine.stream(file source)` end to end (decoding, preprocessing, network, postprocessing in their
threads); "sequential" the same stages one after another in one thread, for reference. The ratio
pipeline / network is what the pipelining keeps of the network's speed (1.0: nothing lost). The
three are measured in turn, --rounds times, and the medians reported, so that a change in the
machine's load hits all three alike (the load average is printed beside them).

With --viewers, the daemon (`edgeflow.runtime.serve`) runs in this process over the looping clip
and N MJPEG clients read /stream.mjpg on loopback; its network fps (from /status) is reported per
N (the clients run in another process), and one client that never reads is added to show the
daemon's memory (RSS) stays flat.
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


def write_clip(directory: Path, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    from edgeflow.synth import video_frames

    frames = []
    for i, (img, _) in enumerate(video_frames(np.random.default_rng(0), count, size, photometric=False)):
        cv2.imwrite(str(directory / f"{i:05d}.png"), img)
        frames.append(img)
    return frames


def network_fps(engine, frames: list[np.ndarray]) -> float:
    xs = [engine.prepare(f) for f in frames]
    engine.run_tensor(xs[0], xs[1])  # warm-up
    t0 = time.perf_counter()
    for a, b in zip(xs, xs[1:]):
        engine.run_tensor(a, b)
    return (len(xs) - 1) / (time.perf_counter() - t0)


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


def pipeline_fps(engine, directory: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    stream = engine.stream(str(directory))
    stats = stream.run()
    return stats.count / (time.perf_counter() - t0), stats.summary()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def daemon_under_viewers(engine, package: Path, directory: Path, counts: list[int], seconds: float,
                         rounds: int, stuck_seconds: float) -> dict:
    """The daemon's network fps with each number of MJPEG viewers (counts taken in turn, `rounds`
    times, medians, `seconds` each), and its RSS and the bytes waiting in viewers' transports
    over `stuck_seconds` without, then with, a viewer that never reads (long enough to fill the
    kernel's socket buffers, after which only awaited writes keep the daemon's memory flat)."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from edgeflow.runtime.serve.daemon import Settings

    url = {}
    ready = threading.Event()
    settings = Settings.load(package=str(package), source=str(directory), loop=True, port=0)
    server = threading.Thread(target=_serve_in_thread, args=(settings, engine, url, ready), daemon=True)
    server.start()
    ready.wait(60)
    base = url["url"]
    samples: dict[int, list[float]] = {n: [] for n in counts}
    client_cpu_s: dict[int, float] = dict.fromkeys(counts, 0.0)  # CPU seconds the viewers' process used

    def status() -> dict:
        with urllib.request.urlopen(base + "status", timeout=10) as r:
            return json.loads(r.read())

    for _ in range(rounds):
        for n in counts:
            clients = subprocess.Popen([sys.executable, "-c", VIEWERS, base + "stream.mjpg", str(n)]) if n else None
            time.sleep(seconds / 2)  # the status window fills with results under this load
            for _ in range(5):
                time.sleep(seconds / 10)
                samples[n].append(status()["fps"]["network"])
            if clients is not None:
                clients.terminate()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                clients.wait()
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                client_cpu_s[n] += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out = {"network_fps_by_viewers": {n: float(np.median(v)) for n, v in samples.items()},
           "viewer_process_cpu_s_per_s": {n: client_cpu_s[n] / (rounds * seconds) for n in counts}}
    rss = {}
    for label in ("without", "with"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?")
    parser.add_argument("--size", default="256x320", help="compiled size when no package is given")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--clip-size", default="480x640")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--viewers", default="", help="e.g. 0,20: MJPEG clients on the daemon")
    parser.add_argument("--seconds", type=float, default=10.0, help="per viewer count")
    parser.add_argument("--stuck-seconds", type=float, default=40.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("EDGEFLOW_CACHE", tempfile.mkdtemp(prefix="edgeflow-bench-"))

    from edgeflow.runtime import load

    size = tuple(int(v) for v in args.size.split("x"))
    clip_size = tuple(int(v) for v in args.clip_size.split("x"))
    package = Path(args.package) if args.package else compile_package(size)
    engine = load(package)
    with tempfile.TemporaryDirectory() as d:
        frames = write_clip(Path(d), args.frames, clip_size)
        nets, seqs, pipes = [], [], []
        for _ in range(args.rounds):
            nets.append(network_fps(engine, frames))
            seqs.append(sequential_fps(engine, Path(d)))
            fps, summary = pipeline_fps(engine, Path(d))
            pipes.append(fps)
        net, seq, pipe = (float(np.median(v)) for v in (nets, seqs, pipes))
        result = {"package": str(package), "input": f"{engine.height}x{engine.width}",
                  "clip": f"{args.frames} frames {clip_size[0]}x{clip_size[1]} PNG", "cpus": os.cpu_count(),
                  "load_average": os.getloadavg()[0], "rounds": args.rounds,
                  "network_fps": net, "sequential_fps": seq, "pipeline_fps": pipe,
                  "pipeline_over_network": pipe / net, "sequential_over_network": seq / net,
                  "pipeline_stage_ms": {k: summary[k] for k in ("capture", "preprocess", "network", "postprocess")}}
        if args.viewers:
            result["daemon"] = daemon_under_viewers(engine, package, Path(d),
                                                    [int(n) for n in args.viewers.split(",")], args.seconds,
                                                    args.rounds, args.stuck_seconds)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    print(f"{result['package']} ({result['input']}), {result['clip']}, {result['cpus']} CPUs, "
          f"load average {result['load_average']:.1f}, medians of {args.rounds} rounds")
    print(f"network    {net:7.2f} fps")
    print(f"sequential {seq:7.2f} fps  ({seq / net:.2f} of network)")
    print(f"pipeline   {pipe:7.2f} fps  ({pipe / net:.2f} of network)")
    daemon = result.get("daemon")
    if daemon:
        by = daemon["network_fps_by_viewers"]
        for n, fps in by.items():
            print(f"daemon, {n:3d} MJPEG viewers: network {fps:6.2f} fps "
                  f"({fps / by[min(by)]:.2f} of {min(by)} viewers; the viewers' process used "
                  f"{daemon['viewer_process_cpu_s_per_s'][n]:.2f} CPU s/s)")
        for label, r in daemon["stuck_viewer"].items():
            print(f"daemon, {label} a viewer that never reads, {args.stuck_seconds:.0f} s: "
                  f"RSS {r['rss_mb_before']:.0f} -> "
                  f"{r['rss_mb_after']:.0f} MB, {r['flow_fields']} flow fields, at most {r['max_buffered_bytes']} "
                  "bytes waiting in the viewers' transports")


if __name__ == "__main__":
    main()
