"""Streaming: consecutive frames of a source -> flow, with per-stage timings as jetson-utils reports them.

Each frame is prepared (converted and resized) once and reused as the first image of the next
pair, so "preprocess" is the cost of one frame. Timings are milliseconds per result:
"capture" (waiting for the source), "preprocess", "network" (inputs in, inference, flow out) and
"postprocess" (resize and scale the flow). `network_fps` is 1000 / network ms; `pipeline_fps`
counts the whole loop, including the time the consumer spends between results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

STAGES = ("capture", "preprocess", "network", "postprocess")


@dataclass
class Result:
    """The flow from the previous frame to `frame` (the second of the pair, BGR)."""

    index: int  # pair number from 0: flow from frame `index` to frame `index + 1` of the stream
    frame: np.ndarray
    flow: np.ndarray  # float32 HxWx2, pixels, at the frame's size
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage, keys STAGES
    network_fps: float = 0.0
    pipeline_fps: float = 0.0


def stream(engine, source, *, max_frames: int | None = None, **source_kw) -> Iterator[Result]:
    """Results for each consecutive frame pair of `source` (a URI, a Source or any iterable of
    BGR frames; `source_kw` go to `open_source`), at most `max_frames` of them. A source opened
    here is closed when the iteration ends or the generator is closed. A change of frame size
    (a camera reopened at another mode) restarts the pairing."""
    from edgeflow.runtime.sources import open_source

    if isinstance(source, (str, int)) or hasattr(source, "__fspath__"):
        src, owned = open_source(source, **source_kw), True
    else:
        src, owned = source, False
    frames = iter(src)
    clock = time.perf_counter
    try:
        prev = prev_x = None
        index = 0
        last = clock()
        while max_frames is None or index < max_frames:
            t0 = clock()
            frame = next(frames, None)
            t1 = clock()
            if frame is None:
                return
            x = engine.prepare(frame)
            t2 = clock()
            if prev is None or prev.shape[:2] != frame.shape[:2]:
                prev, prev_x = frame, x
                continue
            flow = engine.run_tensor(prev_x, x)
            t3 = clock()
            flow = engine.finish(flow, frame.shape[:2])
            t4 = clock()
            timings = {"capture": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3,
                       "network": (t3 - t2) * 1e3, "postprocess": (t4 - t3) * 1e3}
            result = Result(index, frame, flow, timings, network_fps=1.0 / max(t3 - t2, 1e-9),
                            pipeline_fps=1.0 / max(t4 - last, 1e-9))
            prev, prev_x = frame, x
            index += 1
            yield result
            last = t4
    finally:
        if owned:
            src.close()


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
