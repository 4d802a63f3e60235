"""Flow sinks from URIs, symmetric with the sources (as jetson-utils pairs videoOutput with videoSource).

    file://DIR/               flow_NNNNN.flo + flow_NNNNN.png (colour) per pair, each written atomically
    file://out.mp4            colour-coded flow video (.mp4 or .avi), renamed into place on close
    zmq://HOST:PORT           ZeroMQ PUB socket bound there: per pair a two-part message, a JSON
                              header {"frame", "index", "timestamp", "shape", "dtype", "units"}
                              and the raw flow bytes (C order, HxWx2); `?dtype=float16` halves them
    a Python callable         called with each `edgeflow.runtime.pipeline.Result`

A bare path is a file:// sink. Each sink has `write(result)`, `close()` (complete the output) and
`abort()` (drop an incomplete output: the video's temporary file is removed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

import cv2
import numpy as np

from edgeflow.errors import InputError, MissingDependency

SCHEMES = ("file", "zmq")
VIDEO_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}
ZMQ_DTYPES = ("float32", "float16")


class Sink:
    """Receives each Result of a stream (`result.index`, `.frame_id`, `.timestamp`, `.flow` HxWx2)."""

    uri: str = ""

    def write(self, result) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.abort() if exc_type is not None else self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class CallableSink(Sink):
    """Calls `function(result)` for each result."""

    def __init__(self, function: Callable):
        self.function = function
        self.uri = getattr(function, "__name__", repr(function))

    def write(self, result) -> None:
        self.function(result)


class DirectorySink(Sink):
    """flow_NNNNN.flo and flow_NNNNN.png (colour, `max_flow` pixels saturate; None: each frame's
    largest) per pair, NNNNN the result's index; each file appears whole or not at all."""

    def __init__(self, directory: str | os.PathLike, max_flow: float | None = None, uri: str = ""):
        self.directory = Path(directory)
        self.uri = uri or str(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"{self.directory}: exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_flow = max_flow

    def write(self, result) -> None:
        from edgeflow.flow_io import write_atomic, write_flow
        from edgeflow.visualize import flow_to_color

        stem = self.directory / f"flow_{result.index:05d}"
        write_flow(stem.with_suffix(".flo"), result.flow)
        ok, png = cv2.imencode(".png", flow_to_color(result.flow, self.max_flow))
        if not ok:
            raise InputError(f"{stem}.png: OpenCV could not encode the image")
        write_atomic(stem.with_suffix(".png"), png.tobytes())


class VideoSink(Sink):
    """A colour-coded flow video at `fps`, written to a hidden temporary name beside `path` and
    renamed to `path` by `close()`; `abort()` removes it. The size is the first flow's."""

    def __init__(self, path: str | os.PathLike, fps: float = 30.0, max_flow: float | None = None, uri: str = ""):
        self.path = Path(path)
        self.uri = uri or str(path)
        if self.path.suffix.lower() not in VIDEO_FOURCC:
            raise InputError(f"{self.path}: a video name ends in {', '.join(VIDEO_FOURCC)}")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.max_flow = float(fps), max_flow
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp{self.path.suffix}")
        self._writer = None

    def write(self, result) -> None:
        from edgeflow.visualize import flow_to_color

        img = flow_to_color(result.flow, self.max_flow)
        if self._writer is None:
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, (img.shape[1], img.shape[0]))
            if not self._writer.isOpened():
                self._writer = None
                raise InputError(f"{self.path}: OpenCV cannot write this video format")
        self._writer.write(img)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        self.tmp.unlink(missing_ok=True)


class ZmqSink(Sink):
    """A ZeroMQ PUB socket bound to tcp://HOST:PORT. Each result is sent as [JSON header, flow
    bytes]; the header holds "frame" (the frame number in the source), "index" (the pair
    number), "timestamp" (capture time, Unix seconds), "shape" [H, W, 2], "dtype" and "units"
    ("pixels"). Slow subscribers lose messages (send high-water mark `hwm`), never the stream."""

    def __init__(self, host: str, port: int, dtype: str = "float32", hwm: int = 4, uri: str = ""):
        try:
            import zmq
        except ImportError:
            raise MissingDependency("zmq:// sinks need pyzmq; install edgeflow[runtime]") from None
        if dtype not in ZMQ_DTYPES:
            raise InputError(f"zmq sink dtype {dtype!r}; choices: {', '.join(ZMQ_DTYPES)}")
        self.uri = uri or f"zmq://{host}:{port}"
        self.dtype = np.dtype(dtype)
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._socket.close()
            raise InputError(f"{self.uri}: cannot bind ({e})") from None
        self.endpoint = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()  # the real port for port 0

    def write(self, result) -> None:
        import zmq

        flow = np.ascontiguousarray(result.flow, self.dtype)
        header = {"frame": int(result.frame_id), "index": int(result.index), "timestamp": float(result.timestamp),
                  "shape": list(flow.shape), "dtype": self.dtype.name, "units": "pixels"}
        try:
            self._socket.send_multipart([json.dumps(header).encode(), flow], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # PUB drops at the high-water mark anyway; never block the stream
            pass

    def close(self) -> None:
        if not self._socket.closed:
            self._socket.close()


def open_sink(uri, *, fps: float = 30.0, max_flow: float | None = None) -> Sink:
    """The Sink of `uri` (see the module doc): a file:// directory or video, a zmq:// PUB socket,
    or a callable. `fps` is the video frame rate, `max_flow` the pixels of full colour saturation
    (None: each frame's largest). A Sink passed in is returned as it is."""
    if isinstance(uri, Sink):
        return uri
    if callable(uri):
        return CallableSink(uri)
    text = str(uri).strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", text)
    scheme, location = (match.group(1).lower(), match.group(2)) if match else ("file", text)
    if scheme == "zmq":
        return _zmq_sink(location, text)
    if scheme != "file":
        raise InputError(f"unknown sink scheme {scheme + '://'!r} in {text!r}; choices: "
                         + ", ".join(s + "://" for s in SCHEMES))
    path = Path(os.path.expanduser(location))
    if path.suffix.lower() in VIDEO_FOURCC:
        return VideoSink(path, fps, max_flow, uri=text)
    return DirectorySink(path, max_flow, uri=text)


def _zmq_sink(location: str, uri: str) -> ZmqSink:
    address, _, query = location.partition("?")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"{uri}: expected zmq://HOST:PORT, e.g. zmq://127.0.0.1:5555")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(options) - {"dtype"}
    if unknown:
        raise InputError(f"{uri}: unknown option {sorted(unknown)[0]!r}; choices: dtype")
    return ZmqSink(host.strip("[]"), int(port), options.get("dtype", "float32"), uri=uri)
