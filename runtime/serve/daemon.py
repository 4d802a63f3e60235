"""The daemon: a pipelined stream in threads, its latest result and health, served over HTTP.

`serve(settings)` loads the package, starts the stream and the aiohttp server, tells systemd it
is ready, pings its watchdog, and stops on SIGTERM/SIGINT within about a second (stream stopped,
camera released, sockets closed). A file source ends the stream (the last result stays served,
/healthz says why it is 503) unless `loop`; a lost live source is reopened with backoff forever.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from edgeflow.errors import InputError

log = logging.getLogger(__name__)
RECENT = 30  # results in the window of /status's fps and stage means


@dataclass
class Settings:
    """What `edgeflow serve` runs; every field is also a key of the TOML config file."""

    package: str = ""
    source: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # required when `host` is not a loopback address
    loop: bool = False  # file sources: start again at the end
    sinks: list[str] = field(default_factory=list)  # extra sink URIs, e.g. zmq://0.0.0.0:5555
    device: str | None = None
    trust: list[str] = field(default_factory=list)  # public key files; the package must be signed by one
    threads: int | None = None  # CPU threads of the network (None: every physical core)
    width: int = 1280  # CSI camera mode
    height: int = 720
    framerate: int = 30
    flip: int = 0
    reconnect_initial: float = 0.5  # seconds before the first reopen of a lost live source
    reconnect_max: float = 8.0  # longest wait between reopens
    stall_timeout: float = 5.0  # seconds without a flow field before /healthz answers 503
    jpeg_quality: int = 80
    preview_width: int = 320  # each half of the MJPEG preview is at most this wide (colouring costs CPU)
    preview_fps: float = 15.0  # most previews encoded per second for all viewers together (0: one per flow field)

    @classmethod
    def load(cls, config: str | os.PathLike | None = None, **given) -> "Settings":
        """Defaults, overridden by the TOML file `config`, overridden by `given` (None values are
        ignored: not given). InputError for unknown keys or a loopback rule broken."""
        values = {}
        if config is not None:
            values.update(_read_toml(Path(config)))
        values.update({k: v for k, v in given.items() if v is not None})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown setting {unknown[0]!r}; choices: {', '.join(sorted(names))}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not self.package or not self.source:
            raise InputError("settings need a package and a source")
        if not is_loopback(self.host) and not self.token:
            raise InputError(f"host {self.host!r} is beyond loopback: a token is required (token=...)")
        if not 0 <= int(self.port) < 65536:
            raise InputError(f"port {self.port}: expected 0-65535")
        if not self.preview_fps >= 0:
            raise InputError(f"preview_fps {self.preview_fps}: expected frames per second >= 0 (0: no cap)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None


class Daemon:
    """The stream of `settings` on `engine`, with what the endpoints read: the latest result,
    its preview JPEG (encoded only when someone watches, once for all viewers, at most
    `preview_fps` times a second), counters and health. `on_result` (set by the app) is called
    from the daemon's thread after each result."""

    def __init__(self, settings: Settings, engine):
        from edgeflow.runtime.sources import Backoff, open_source, opencv_info

        self.settings = settings
        self.engine = engine
        self.opencv = opencv_info()
        self._backoff = Backoff(attempts=None, initial=settings.reconnect_initial, maximum=settings.reconnect_max)
        self._open_source = lambda: open_source(settings.source, backoff=self._backoff, width=settings.width,
                                                height=settings.height, framerate=settings.framerate,
                                                flip=settings.flip, loop=settings.loop)
        self.source = self._open_source()
        self.started = time.time()
        self.on_result: Callable[[], None] | None = None
        self.viewer_transports: set = set()  # of the /stream.mjpg responses (event loop only)
        self.state = "starting"  # starting, streaming, ended, failed (and being started again), stopped
        self.reason = ""
        self.restarts = 0  # streams started again after a failure
        self._past = {"dropped": 0, "reopens": 0, "failures": 0}  # counts of the streams and sources before
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()  # one preview encoding at a time: the others then find it cached
        self.previews_encoded = 0
        self._latest = None  # the last Result
        self._last_at = 0.0  # time.monotonic() of it
        self._count = 0
        self._jpeg: tuple[int, bytes] | None = None  # (count, preview) of the last preview encoded
        self._jpeg_at = -float("inf")  # time.monotonic() of its encoding
        self._recent: collections.deque = collections.deque(maxlen=RECENT)
        self._stream = None
        self._thread: threading.Thread | None = None

        from edgeflow.runtime.serve.metrics import Metrics

        self.metrics = Metrics(self)

    # -- the stream thread --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the stream (into `settings.sinks`) and the thread that takes its results."""
        self._stream = self.engine.stream(self.source, sinks=self.settings.sinks)
        self._thread = threading.Thread(target=self._run, name="edgeflow-daemon", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Take the stream's results. A stream that fails (a file source removed or unreadable, a
        sink's error) is started again from a freshly opened source after backoff delays, for as
        long as the daemon runs; a live source's own losses are reopened inside the stream."""
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._stream is None:
                    self._restart()
                for result in self._stream:
                    failures = 0
                    self._publish(result)
                if not self._stopping.is_set():
                    self.state, self.reason = "ended", "the file source reached its end (serve with loop to repeat it)"
                return
            except Exception as e:  # noqa: BLE001 - the daemon stays up, reports it and tries again
                if self._stream is not None:  # closed already when the failure was its own
                    self._stream.close(abort=True)
                    self._past["dropped"] += self._stream.dropped
                self._stream = None
                failures += 1
                delay = self._backoff.delay(failures)
                reason = " ".join(str(e).split()) or type(e).__name__
                log.error("stream failed: %s; starting it again in %.3g s", reason, delay)
                self.state, self.reason = "failed", f"{reason}; starting it again in {delay:.3g} s"
                self._stopping.wait(delay)

    def _restart(self) -> None:
        """A new stream over a newly opened source (InputError while the source is still missing)."""
        old = self.source
        old.close()
        self.source = self._open_source()
        for key in ("reopens", "failures"):
            self._past[key] += int(getattr(old, key, 0))
        self._stream = self.engine.stream(self.source, sinks=self.settings.sinks)
        self.restarts += 1
        if self._stopping.is_set():  # stop() ran meanwhile and saw the old ones
            self._stream.close()
            self.source.close()

    def _publish(self, result) -> None:
        """Make `result` the latest (its timings are complete: the sinks have run)."""
        with self._lock:
            self._latest = result
            self._last_at = time.monotonic()
            self._count += 1
            self._recent.append((1.0 / result.pipeline_fps, result.timings, result.latency))
        self.state = "streaming"
        self.metrics.observe(result)
        if self.on_result is not None:
            self.on_result()

    def stop(self) -> None:
        """Stop the stream and release the source (the sinks it opened are closed)."""
        self.state = "stopped"
        self._stopping.set()
        if self.source.live:  # first: wakes a capture waiting to reopen the camera
            self.source.close()
        if self._stream is not None:
            self._stream.close()
        self.source.close()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def alive(self) -> bool:
        """Whether the stream thread runs, or has ended as it should (a file source's end)."""
        return self.state in ("ended", "stopped") or (self._thread is not None and self._thread.is_alive())

    # -- what the endpoints read --------------------------------------------------------------------

    def latest(self):
        """(count, Result) of the latest flow field; (0, None) before the first."""
        with self._lock:
            return self._count, self._latest

    def preview_jpeg(self) -> tuple[int, bytes | None]:
        """(count, JPEG) of the current preview (camera and colour flow side by side): encoded by
        whoever asks first once a newer result exists and the cap allows; call it off the event
        loop (it takes about a millisecond)."""
        from edgeflow.runtime.serve.preview import preview_jpeg

        with self._encode_lock:
            cached = self.cached_preview()
            if cached is not None:
                return cached
            with self._lock:
                count, result = self._count, self._latest
            if result is None:
                return 0, None
            jpeg = preview_jpeg(result.frame, result.flow, self.settings.preview_width, self.settings.jpeg_quality)
            self.previews_encoded += 1
            with self._lock:
                self._jpeg, self._jpeg_at = (count, jpeg), time.monotonic()
                return self._jpeg

    def cached_preview(self) -> tuple[int, bytes | None] | None:
        """(count, JPEG) of the last preview while it is current (no newer result, or the next
        is not due yet under `preview_fps`); None when a new one should be encoded."""
        with self._lock:
            if self._jpeg is not None and (self._jpeg[0] == self._count or self.preview_due_in() > 0):
                return self._jpeg
        return None

    def preview_due_in(self) -> float:
        """Seconds until the cap lets the next preview be encoded (0: now)."""
        fps = self.settings.preview_fps
        return max(0.0, self._jpeg_at + 1.0 / fps - time.monotonic()) if fps > 0 else 0.0

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): healthy while flow fields come; the reason says why not."""
        src = self.source
        if self.state == "ended":
            return False, f"stream ended: {self.reason}"
        if self.state == "failed":
            return False, f"stream failed: {self.reason}"
        if self.state == "stopped":
            return False, "stopping"
        source_state = getattr(src, "state", "streaming")
        if source_state.startswith("lost"):
            return False, (f"source {src.uri} {source_state}; reopening with backoff "
                           f"({getattr(src, 'reopens', 0)} reconnects so far)")
        count, _ = self.latest()
        if count == 0:
            return False, "waiting for the first flow field"
        age = time.monotonic() - self._last_at
        if age > self.settings.stall_timeout:
            return False, f"no flow field for {age:.1f} s (source {src.uri} is {source_state})"
        return True, "ok"

    def status(self) -> dict:
        """The JSON of /status (also what /metrics reads); call it in the event loop."""
        healthy, reason = self.health()
        count, result = self.latest()
        stream = self._stream
        with self._lock:
            recent = list(self._recent)
        stages, pipeline_fps, network_fps, latency = {}, 0.0, 0.0, 0.0
        if recent:
            stages = {k: float(np.mean([t[k] for _, t, _ in recent])) for k in recent[-1][1]}
            network_fps = 1e3 / stages["network"] if stages.get("network") else 0.0
            latency = float(np.mean([lat for _, _, lat in recent]))
            span = sum(interval for interval, _, _ in recent)  # seconds between results leaving the pipeline
            pipeline_fps = len(recent) / span if span > 0 else 0.0
        src, m = self.source, self.engine.manifest
        source_state = getattr(src, "state", "streaming" if count else "opening")
        return {
            "state": self.state, "healthy": healthy, "reason": reason,
            "frames": count, "frame_id": result.frame_id if result is not None else None,
            "timestamp": result.timestamp if result is not None else None,
            "dropped": self._past["dropped"] + (stream.dropped if stream is not None else 0),
            "restarts": self.restarts,
            "fps": {"pipeline": pipeline_fps, "network": network_fps},
            "stages_ms": stages, "latency_s": latency,
            "source": {"uri": src.uri, "live": bool(src.live), "state": source_state,
                       "up": source_state == "streaming" and self.state == "streaming",
                       "reconnects": self._past["reopens"] + int(getattr(src, "reopens", 0)),
                       "failures": self._past["failures"] + int(getattr(src, "failures", 0))},
            "viewers": len(self.viewer_transports), "previews_encoded": self.previews_encoded,
            "mjpeg_buffered_bytes": sum(t.get_write_buffer_size() for t in self.viewer_transports
                                        if not t.is_closing()),
            "package": {"model": m["model"].get("name"), "input": f"{self.engine.height}x{self.engine.width}",
                        "precision": m.get("precision"), "target": m["target"].get("name"),
                        "device": self.engine.device},
            "opencv": self.opencv,
            "started": self.started, "uptime_s": time.time() - self.started,
        }


def serve(settings: Settings, *, engine=None, ready: Callable[[str], None] | None = None) -> None:
    """Run the daemon of `settings` until SIGTERM or SIGINT. `ready(url)` is called once the
    server listens (the real port when `settings.port` is 0). `engine` defaults to
    `edgeflow.runtime.load(settings.package, device=..., trusted_keys=..., threads=...)` of the
    settings (trust: None where empty, so $EDGEFLOW_TRUSTED_KEYS still applies)."""
    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        from edgeflow.errors import MissingDependency

        raise MissingDependency(f"edgeflow serve needs {e.name}; install edgeflow[runtime] "
                                "(or edgeflow[serve] beside JetPack's OpenCV)") from None
    settings.check()
    if engine is None:
        from edgeflow.runtime import load

        engine = load(settings.package, device=settings.device, trusted_keys=settings.trust or None,
                      threads=settings.threads)
    daemon = Daemon(settings, engine)
    try:
        asyncio.run(_main(daemon, ready))
    finally:
        daemon.stop()


async def _main(daemon: Daemon, ready: Callable[[str], None] | None) -> None:
    from aiohttp import web

    from edgeflow.runtime.serve import systemd
    from edgeflow.runtime.serve.app import make_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = make_app(daemon)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, daemon.settings.host, int(daemon.settings.port))
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise InputError(f"cannot listen on {daemon.settings.host}:{daemon.settings.port} ({e.strerror})") from None
    host, port = runner.addresses[0][:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    daemon.start()
    if ready is not None:
        ready(url)
    systemd.notify(f"READY=1\nSTATUS=serving {daemon.source.uri} on {url}")
    interval = systemd.watchdog_interval()
    watchdog = asyncio.create_task(_watchdog(daemon, interval)) if interval else None
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
        app["hub"].close()
        await loop.run_in_executor(None, daemon.stop)
        await runner.cleanup()


async def _watchdog(daemon: Daemon, interval: float) -> None:
    """Ping systemd's watchdog while the event loop runs and the stream thread lives (a lost
    camera being reopened still pings: systemd must not restart what is already retrying)."""
    from edgeflow.runtime.serve import systemd

    while True:
        if daemon.alive():
            healthy, reason = daemon.health()
            systemd.notify(f"WATCHDOG=1\nSTATUS={'streaming' if healthy else reason}")
        await asyncio.sleep(interval)
