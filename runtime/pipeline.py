"""Pipelined streaming: frames of a source -> flow -> sinks, in four threaded stages, as
jetson-utils times them.

    capture ──q──► preprocess ──q──► network ──q──► postprocess + sinks ──q──► the iterating caller

Each queue holds at most `queue_size` items, so nothing grows without bound. A live source
(camera, network stream) never waits for the network: when the first queue is full the oldest
frame is dropped (latest frame wins) and counted in `Stream.dropped`; a file source is never
dropped from, the capture waits instead. Each frame is prepared once, into the next buffer of a
ring (page-locked memory for CUDA engines where pycuda works: `edgeflow.runtime.buffers`), and
reused as the first image of the next pair. Timings are milliseconds per result: "capture" (waiting for the source),
"preprocess" (converting and resizing the second frame), "network" (inputs in, inference, flow
out) and "postprocess" (resizing and scaling the flow, then the sinks). `network_fps` is
1000 / network ms; `pipeline_fps` the rate at which results leave the pipeline.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

STAGES = ("capture", "preprocess", "network", "postprocess")
_END = object()  # end of the stream, passed down the queues


@dataclass
class Result:
    """The flow from the previous frame to `frame` (the second of the pair, BGR)."""

    index: int  # pair number from 0
    frame: np.ndarray
    flow: np.ndarray  # float32 HxWx2, pixels, at the frame's size
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage, keys STAGES
    network_fps: float = 0.0
    pipeline_fps: float = 0.0
    frame_id: int = 0  # number of `frame` in the source from 0, dropped frames counted
    timestamp: float = 0.0  # capture time of `frame`, Unix seconds
    latency: float = 0.0  # seconds from the capture of `frame` to the end of the sinks
    dropped: int = 0  # frames dropped so far in this stream


@dataclass
class _Frame:
    frame_id: int
    image: np.ndarray
    timestamp: float
    start: float  # perf_counter at capture
    timings: dict[str, float]
    x: np.ndarray | None = None


class Stream:
    """An iterator of Results over a source, its four stages running in threads; `close()` (or
    a `with` block) stops them. `run()` drains it and returns its Stats. Build it with
    `engine.stream(...)` or `stream(engine, ...)`."""

    def __init__(self, engine, source, *, sinks: Iterable = (), max_frames: int | None = None,
                 queue_size: int = 2, drop: bool | None = None, **source_kw):
        from edgeflow.runtime.buffers import BufferRing
        from edgeflow.runtime.sinks import open_sink
        from edgeflow.runtime.sources import open_source

        if isinstance(source, (str, int)) or hasattr(source, "__fspath__"):
            self.source, self._owns_source = open_source(source, **source_kw), True
        else:
            self.source, self._owns_source = source, False
        self.engine = engine
        self.sinks, self._owned_sinks = [], []
        try:
            for s in sinks:
                sink = open_sink(s, fps=getattr(self.source, "fps", None) or 30.0)
                self.sinks.append(sink)
                if isinstance(s, str):
                    self._owned_sinks.append(sink)
        except BaseException:
            self._finish_sinks(abort=True)
            if self._owns_source:
                self.source.close()
            raise
        self.max_frames = max_frames
        self.drop = bool(getattr(self.source, "live", False)) if drop is None else drop
        self.dropped = 0
        self.stats = Stats()
        self.ended = False  # the source reached its end (or max_frames): no more results
        self._stop = threading.Event()
        self._queues = [queue.Queue(queue_size) for _ in range(4)]
        # Prepared frames in flight: one in preprocess, `queue_size` queued, two in the network.
        self._buffers = BufferRing.for_engine(engine, queue_size + 4)
        self._closed = False
        self._error: BaseException | None = None  # the first failure of a stage, raised to the caller
        # CPU seconds each stage's thread used, complete once the stream is closed. The network
        # stage only hands pairs to the Engine's thread: the network's own CPU is not in it.
        self.stage_cpu_s = dict.fromkeys(STAGES, 0.0)
        stages = (self._capture, self._preprocess, self._network, self._postprocess)
        self._threads = [threading.Thread(target=self._guard, args=(f, i), name=f"edgeflow-{name}", daemon=True)
                         for i, (f, name) in enumerate(zip(stages, STAGES))]
        for t in self._threads:
            t.start()

    # -- the caller's side ------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> Result:
        item = _END if self._closed else self._get(3)
        if item is _END:
            self.close(abort=self._error is not None)
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def run(self) -> Stats:
        """Consume the stream to its end (or until `close()` from another thread); its Stats."""
        for _ in self:
            pass
        return self.stats

    def close(self, abort: bool = False) -> None:
        """Stop the stages and release what this stream opened: the source (when given as a URI)
        and the sinks given as URIs (completed, or dropped with `abort`)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        live = getattr(self.source, "live", False)
        if self._owns_source and live:  # wakes a capture waiting to reopen a camera
            self.source.close()
        deadline = time.monotonic() + 1.5  # a stage busy in a long inference is left to finish alone
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._owns_source and not live:
            self.source.close()
        self._finish_sinks(abort)

    def _finish_sinks(self, abort: bool) -> None:
        for sink in self._owned_sinks:
            sink.abort() if abort else sink.close()
        self._owned_sinks = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))

    # -- the stages ---------------------------------------------------------------------------------

    def _guard(self, stage, index: int) -> None:
        """Run `stage` and pass its end down; a failure stops all stages and is raised to the caller."""
        try:
            stage()
            self._put(index, _END)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            if self._error is None:
                self._error = e
            self._stop.set()
        finally:
            self.stage_cpu_s[STAGES[index]] = time.thread_time()

    def _capture(self) -> None:
        frames = iter(self.source)
        clock = time.perf_counter
        frame_id = 0
        while not self._stop.is_set():
            t0 = clock()
            image = next(frames, None)
            t1 = clock()
            if image is None:
                return
            item = _Frame(frame_id, image, time.time(), t1, {"capture": (t1 - t0) * 1e3})
            frame_id += 1
            if self.drop:
                self._put_latest(item)
            else:
                self._put(0, item)

    def _preprocess(self) -> None:
        while (item := self._pass_on(0, 1)) is not None:
            t0 = time.perf_counter()
            item.x = self.engine.prepare(item.image, out=self._buffers.next())
            item.timings["preprocess"] = (time.perf_counter() - t0) * 1e3
            self._put(1, item)

    def _network(self) -> None:
        prev = None
        pairs = 0
        while (self.max_frames is None or pairs < self.max_frames) and (item := self._pass_on(1, 2)) is not None:
            if prev is None or prev.image.shape[:2] != item.image.shape[:2]:
                prev = item  # the first frame, or a camera reopened at another size: restart pairing
                continue
            t0 = time.perf_counter()
            flow = self.engine.run_tensor(prev.x, item.x)
            item.timings["network"] = (time.perf_counter() - t0) * 1e3
            prev.x = None
            prev = item
            self._put(2, (pairs, item, flow))
            pairs += 1

    def _postprocess(self) -> None:
        last = None
        while (entry := self._pass_on(2, 3)) is not None:
            index, item, flow = entry
            t0 = time.perf_counter()
            flow = self.engine.finish(flow, item.image.shape[:2])
            result = Result(index, item.image, flow, item.timings, frame_id=item.frame_id,
                            timestamp=item.timestamp, dropped=self.dropped)
            for sink in self.sinks:
                sink.write(result)
            t1 = time.perf_counter()
            item.timings["postprocess"] = (t1 - t0) * 1e3
            result.network_fps = 1e3 / max(item.timings["network"], 1e-6)
            result.pipeline_fps = 1.0 / max(t1 - (last if last is not None else item.start), 1e-9)
            result.latency = t1 - item.start
            last = t1
            self.stats.add(result)
            self._put(3, result)

    # -- queues -----------------------------------------------------------------------------------

    def _pass_on(self, src: int, dst: int):
        """The next item of queue `src`; None when the stream ends or stops (the end is passed on
        to queue `dst` first)."""
        item = self._get(src)
        if item is _END:
            if src == 2 and not self._stop.is_set():
                self.ended = True
            self._put(dst, _END)
            return None
        return item

    def _get(self, index: int):
        q = self._queues[index]
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return _END

    def _put(self, index: int, item) -> None:
        """Put `item` on queue `index`, waiting for room; gives up when the stream is stopped."""
        q = self._queues[index]
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def _put_latest(self, item: _Frame) -> None:
        """Latest frame wins: drop the oldest waiting frame when the first queue is full."""
        q = self._queues[0]
        while True:
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                try:
                    q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass


def stream(engine, source, *, sinks: Iterable = (), max_frames: int | None = None, **kw) -> Stream:
    """A Stream of Results for consecutive frame pairs of `source` (a URI, a Source or any
    iterable of BGR frames), feeding each result to `sinks` (URIs, Sinks or callables; see
    `open_sink`), at most `max_frames` results. `queue_size` bounds each queue; `drop` forces
    the latest-frame-wins policy on or off (default: on for live sources); other keywords go to
    `open_source`. A change of frame size (a camera reopened at another mode) restarts the pairing."""
    return Stream(engine, source, sinks=sinks, max_frames=max_frames, **kw)


class Stats:
    """Running totals over results, for summaries: mean ms per stage and the two fps figures."""

    def __init__(self) -> None:
        self.count = 0
        self.total_ms = dict.fromkeys(STAGES, 0.0)
        self.loop_s = 0.0

    def add(self, result: Result) -> None:
        self.count += 1
        for k in STAGES:
            self.total_ms[k] += result.timings[k]
        self.loop_s += 1.0 / result.pipeline_fps

    def summary(self) -> dict[str, float]:
        """{stage: mean ms, "network_fps", "pipeline_fps"} (zeros before the first result)."""
        n = self.count
        out = {k: (v / n if n else 0.0) for k, v in self.total_ms.items()}
        out["network_fps"] = n * 1e3 / self.total_ms["network"] if n and self.total_ms["network"] else 0.0
        out["pipeline_fps"] = n / self.loop_s if n and self.loop_s else 0.0
        return out
