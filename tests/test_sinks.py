"""Flow sinks: file directories and videos, ZeroMQ PUB with its JSON header, callables, URI errors."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from conftest import count_video_frames

from edgeflow.errors import InputError
from edgeflow.runtime.pipeline import Result
from edgeflow.runtime.sinks import CallableSink, DirectorySink, VideoSink, ZmqSink, open_sink


def result(index: int, rng, h: int = 24, w: int = 40) -> Result:
    flow = rng.normal(0, 3, (h, w, 2)).astype(np.float32)
    return Result(index, np.zeros((h, w, 3), np.uint8), flow, frame_id=10 + index, timestamp=1700000000.5 + index)


def test_directory_sink_writes_flo_and_png(tmp_path, rng):
    from edgeflow import read_flow

    sink = open_sink(f"file://{tmp_path}/out/")
    assert isinstance(sink, DirectorySink)
    results = [result(i, rng) for i in range(3)]
    for r in results:
        sink.write(r)
    sink.close()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"flow_{i:05d}.{ext}" for i in range(3) for ext in ("flo", "png")]
    np.testing.assert_array_equal(read_flow(tmp_path / "out" / "flow_00002.flo"), results[2].flow)
    assert cv2.imread(str(tmp_path / "out" / "flow_00000.png")).shape == (24, 40, 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):
        open_sink(str(tmp_path / "file"))


def test_video_sink_renames_on_close_and_removes_on_abort(tmp_path, rng):
    path = tmp_path / "flow.mp4"
    sink = open_sink(f"file://{path}", fps=12)
    assert isinstance(sink, VideoSink)
    for i in range(4):
        sink.write(result(i, rng))
    assert not path.exists() and sink.tmp.exists()  # complete only on close
    sink.close()
    assert count_video_frames(path) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["flow.mp4"]

    with pytest.raises(RuntimeError):
        with open_sink(tmp_path / "broken.avi") as sink:
            sink.write(result(0, rng))
            raise RuntimeError("the stream failed")
    assert [p.name for p in tmp_path.iterdir()] == ["flow.mp4"]  # no partial video, no temp file


def subscriber(endpoint: str):
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    return sub


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_zmq_sink_publishes_header_and_raw_flow(rng, dtype):
    sink = open_sink(f"zmq://127.0.0.1:0?dtype={dtype}" if dtype != "float32" else "zmq://127.0.0.1:0")
    assert isinstance(sink, ZmqSink) and sink.endpoint.startswith("tcp://127.0.0.1:")
    sub = subscriber(sink.endpoint)
    try:
        r = result(0, rng)
        deadline = time.monotonic() + 5
        while not sub.poll(50):  # the subscription takes a moment to reach the publisher
            assert time.monotonic() < deadline, "no message reached the subscriber"
            sink.write(r)
        header, payload = sub.recv_multipart()
        meta = json.loads(header)
        assert meta == {"frame": 10, "index": 0, "timestamp": 1700000000.5, "shape": [24, 40, 2], "dtype": dtype,
                        "units": "pixels"}
        flow = np.frombuffer(payload, dtype).reshape(meta["shape"])
        np.testing.assert_array_equal(flow, r.flow.astype(dtype))
    finally:
        sub.close()
        sink.close()


def test_zmq_uri_errors():
    with pytest.raises(InputError, match="expected zmq://HOST:PORT"):
        open_sink("zmq://localhost")
    with pytest.raises(InputError, match="unknown option 'hwm'; choices: dtype"):
        open_sink("zmq://127.0.0.1:0?hwm=3")
    with pytest.raises(InputError, match="zmq sink dtype 'int8'; choices: float32, float16"):
        open_sink("zmq://127.0.0.1:0?dtype=int8")
    with open_sink("zmq://127.0.0.1:0") as taken:
        port = taken.endpoint.rsplit(":", 1)[1]
        with pytest.raises(InputError, match=f"zmq://127.0.0.1:{port}: cannot bind"):
            open_sink(f"zmq://127.0.0.1:{port}")


def test_callable_and_unknown_schemes(rng):
    seen = []
    sink = open_sink(seen.append)
    assert isinstance(sink, CallableSink) and open_sink(sink) is sink
    r = result(0, rng)
    sink.write(r)
    assert seen == [r]
    with pytest.raises(InputError, match=r"unknown sink scheme 'rtsp://' in 'rtsp://x'; choices: file://, zmq://"):
        open_sink("rtsp://x")
