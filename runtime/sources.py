"""Video sources from URIs in the jetson-utils dialect; each Source is an iterator of BGR frames.

    csi://0                   MIPI CSI camera 0 through nvarguscamerasrc (OpenCV with GStreamer)
    v4l2:///dev/video0        V4L2 camera (also v4l2://0)
    rtsp://host:port/path     RTSP stream (OpenCV's FFmpeg or GStreamer backend)
    http://host:port/x.mjpg   HTTP stream, e.g. an IP camera's MJPEG (OpenCV's FFmpeg backend)
    file://clip.mp4           video file; file://frames/ a directory of images (natural sort),
                              file://frames/*.png a glob; file:///abs/path for absolute paths

Bare strings are guessed the same way: `/dev/video0` and integers are V4L2 cameras, anything
else a path (or glob). File sources end the iteration at their end (or start again with
`loop=True`); live sources (csi, v4l2, rtsp, http) that stop delivering are reopened with
exponential backoff (`Backoff`), each attempt logged as a warning (stderr), and raise InputError
when the attempts run out (`Backoff(attempts=None)` retries forever, as the daemon does).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from edgeflow.errors import InputError, MissingDependency

SCHEMES = ("csi", "v4l2", "rtsp", "http", "https", "file")
LIVE = ("csi", "v4l2", "rtsp", "http", "https")
# Milliseconds an FFmpeg network capture (rtsp, http) may wait to open and for each frame.
NETWORK_TIMEOUT_MS = 5000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Reopen policy of a live source: up to `attempts` tries in a row (None: forever), waiting
    initial * factor**k seconds (at most `maximum`) before try k+1."""

    attempts: int | None = 6
    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (1-based)."""
        return min(self.maximum, self.initial * self.factor ** (attempt - 1))


class Source:
    """An iterator of uint8 HxWx3 BGR frames; `close()` (or a `with` block) releases it."""

    uri: str = ""
    live: bool = False

    @property
    def fps(self) -> float | None:
        """Frame rate the source reports, or None."""
        return None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class ImageSequence(Source):
    """Image files read in the order given."""

    def __init__(self, paths: list[str | os.PathLike], uri: str = ""):
        self.paths = [Path(p) for p in paths]
        self.uri = uri or str(self.paths[0].parent if self.paths else "")
        self._next = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __next__(self) -> np.ndarray:
        if self._next >= len(self.paths):
            raise StopIteration
        path = self.paths[self._next]
        self._next += 1
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise InputError(f"{path}: not a readable image")
        return frame

    def close(self) -> None:
        self._next = len(self.paths)


class VideoFile(Source):
    """A video file decoded by OpenCV; the iteration ends at the end of the file."""

    def __init__(self, path: str | os.PathLike, uri: str = ""):
        self.path = Path(path)
        self.uri = uri or str(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such video file")
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            self._cap.release()
            raise InputError(f"{self.path}: OpenCV cannot open it as a video")

    @property
    def fps(self) -> float | None:
        fps = self._cap.get(cv2.CAP_PROP_FPS) if self._cap is not None else 0
        return fps if fps and fps > 0 else None

    def __next__(self) -> np.ndarray:
        if self._cap is None:
            raise StopIteration
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self.close()
            raise StopIteration
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class LiveSource(Source):
    """A camera or stream: `opener()` returns a capture (`read() -> (ok, frame)`, `isOpened()`,
    `release()`, as cv2.VideoCapture). A capture that fails to open or stops delivering is
    released and reopened after backoff delays; InputError when `backoff.attempts` tries in a
    row have failed. `sleep` is injectable for tests; the default wait ends early on `close()`,
    which another thread may call while this one waits (the reader releases the capture).

    `state` ("opening", "streaming" or "lost: REASON") and the counters `reopens` (successful
    reopens after a loss) and `failures` (failed attempts in all) may be read from any thread."""

    live = True

    def __init__(self, opener: Callable[[], object], uri: str, backoff: Backoff = Backoff(),
                 sleep: Callable[[float], None] | None = None):
        self.uri = uri
        self.backoff = backoff
        self._opener = opener
        self._closing = threading.Event()
        self._sleep = sleep or self._closing.wait
        self._lock = threading.Lock()  # held by the reading thread while it uses the capture
        self._cap = None
        self._closed = False
        self._delivered = 0
        self.reopens = 0
        self.failures = 0
        self.state = "opening"

    @property
    def fps(self) -> float | None:
        fps = self._cap.get(cv2.CAP_PROP_FPS) if self._cap is not None and hasattr(self._cap, "get") else 0
        return fps if fps and fps > 0 else None

    def __next__(self) -> np.ndarray:
        failures = 0
        limit = self.backoff.attempts
        while True:
            with self._lock:
                if self._closed:
                    self._release()
                    raise StopIteration
                reason = self._ensure_open()
                if self._cap is not None:
                    ok, frame = self._cap.read()
                    if ok and frame is not None:
                        self._delivered += 1
                        self.state = "streaming"
                        return frame
                    self._release()
                    reason = "lost" if self._delivered else "delivers no frames"
            failures += 1
            self.failures += 1
            self.state = f"lost: {reason}"
            if limit is not None and failures > limit:
                self.close()
                raise InputError(f"{self.uri}: {reason}; gave up after {limit} reopen attempts")
            delay = self.backoff.delay(failures)
            log.warning("%s: %s; reopening in %.3g s (attempt %d/%s)", self.uri, reason, delay, failures,
                        "unlimited" if limit is None else limit)
            self._sleep(delay)

    def _ensure_open(self) -> str:
        """Open the capture if it is not; the reason of a failure ("" when open)."""
        if self._cap is not None:
            return ""
        try:
            cap = self._opener()
        except (cv2.error, OSError, RuntimeError) as e:
            return f"cannot open ({' '.join(str(e).split())})"
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            return "cannot open"
        if self._delivered:
            self.reopens += 1
        self._cap = cap
        return ""

    def _release(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None

    def close(self) -> None:
        self._closed = True
        self._closing.set()
        if self._lock.acquire(timeout=0.5):  # else the reading thread releases after its read
            try:
                self._release()
            finally:
                self._lock.release()


class LoopingSource(Source):
    """A file source that starts again at its end: `opener()` returns a fresh Source each pass."""

    def __init__(self, opener: Callable[[], Source], uri: str):
        self.uri = uri
        self._opener = opener
        self._src = opener()
        self.passes = 1

    @property
    def fps(self) -> float | None:
        return self._src.fps if self._src is not None else None

    def __next__(self) -> np.ndarray:
        if self._src is None:
            raise StopIteration
        frame = next(self._src, None)
        if frame is None:
            self._src.close()
            self._src = self._opener()
            self.passes += 1
            frame = next(self._src, None)
            if frame is None:
                raise StopIteration
        return frame

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None


def parse_uri(uri: str | int | os.PathLike) -> tuple[str, str]:
    """(scheme, location) of a source URI or bare string; InputError for an unknown scheme."""
    if isinstance(uri, int):
        return "v4l2", str(uri)
    text = str(uri).strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", text)
    if match:
        scheme, location = match.group(1).lower(), match.group(2)
        if scheme not in SCHEMES:
            raise InputError(f"unknown source scheme {scheme + '://'!r} in {text!r}; choices: "
                             + ", ".join(s + "://" for s in SCHEMES))
        if scheme in ("rtsp", "http", "https"):
            location = text
        return scheme, location
    if text.isdigit() or text.startswith("/dev/video"):
        return "v4l2", text
    return "file", text


def open_source(uri, *, backoff: Backoff = Backoff(), width: int = 1280, height: int = 720,
                framerate: int = 30, flip: int = 0, loop: bool = False) -> Source:
    """The Source of `uri` (see the module doc). `width`/`height`/`framerate`/`flip` configure CSI
    cameras; `backoff` the reopening of live sources; `loop` restarts file sources at their end.
    A Source passed in is returned as it is."""
    if isinstance(uri, Source):
        return uri
    scheme, location = parse_uri(uri)
    text = str(uri)
    if scheme == "file":
        if loop:
            return LoopingSource(lambda: _file_source(location, text), text)
        return _file_source(location, text)
    if scheme == "csi":
        if not location.isdigit():
            raise InputError(f"{text}: expected csi://N with N the sensor id")
        if not has_gstreamer():
            raise MissingDependency("csi:// cameras need OpenCV built with GStreamer (JetPack's python3-opencv); "
                                    "this OpenCV has none")
        pipeline = csi_pipeline(int(location), width, height, framerate, flip)
        return LiveSource(lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER), text, backoff)
    if scheme == "v4l2":
        device = int(location) if location.isdigit() else location
        if not isinstance(device, int) and not location.startswith("/"):
            raise InputError(f"{text}: expected v4l2:///dev/videoN or v4l2://N")
        return LiveSource(lambda: cv2.VideoCapture(device, cv2.CAP_V4L2), text, backoff)
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]
    return LiveSource(lambda: cv2.VideoCapture(location, cv2.CAP_ANY, timeouts), text, backoff)  # rtsp, http


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, framerate: int = 30,
                 flip: int = 0) -> str:
    """The GStreamer pipeline (for cv2.CAP_GSTREAMER) of a Jetson CSI camera, delivering BGR."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, "
            f"framerate=(fraction){framerate}/1, format=(string)NV12 ! "
            f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
            f"videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1")


def has_gstreamer() -> bool:
    """Whether this OpenCV was built with the GStreamer backend."""
    return any(line.strip().startswith("GStreamer:") and "YES" in line
               for line in cv2.getBuildInformation().splitlines())


def opencv_info() -> dict:
    """Which OpenCV this process loaded: {"version", "path" (of the module), "gstreamer",
    "ffmpeg" (bools: backends built in)}. PyPI's wheels have no GStreamer; JetPack's has."""
    backends = {line.split(":")[0].strip(): "YES" in line for line in cv2.getBuildInformation().splitlines()
                if line.strip().startswith(("GStreamer:", "FFMPEG:"))}
    return {"version": cv2.__version__, "path": os.path.dirname(getattr(cv2, "__file__", "") or ""),
            "gstreamer": backends.get("GStreamer", False), "ffmpeg": backends.get("FFMPEG", False)}


def _file_source(location: str, uri: str) -> Source:
    path = os.path.expanduser(location)
    if glob.has_magic(path):
        paths = [p for p in glob.glob(path) if os.path.isfile(p)]
        if not paths:
            raise InputError(f"{uri}: the pattern matches no files")
        return ImageSequence(sorted(paths, key=_natural), uri)
    p = Path(path)
    if p.is_dir():
        paths = [c for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise InputError(f"{p}: directory holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return ImageSequence(sorted(paths, key=lambda c: _natural(c.name)), uri)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSequence([p], uri)
    return VideoFile(p, uri)


def _natural(name: str) -> list:
    """Sort key putting frame2 before frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(name))]
