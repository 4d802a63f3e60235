"""Video sources: URI parsing, real video files and image directories/globs, live reconnect with backoff."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from edgeflow.errors import InputError, MissingDependency
from edgeflow.runtime.sources import (Backoff, ImageSequence, LiveSource, VideoFile, csi_pipeline, has_gstreamer,
                                      open_source, parse_uri)


def frame(value: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


@pytest.fixture
def png_dir(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in (1, 2, 10):  # natural order 1, 2, 10 (not 1, 10, 2)
        cv2.imwrite(str(d / f"frame{i}.png"), frame(i * 20))
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 12, (32, 24))
    for i in range(7):
        writer.write(frame(30 * i))
    writer.release()
    return path


@pytest.mark.parametrize("uri, expected", [
    ("csi://0", ("csi", "0")),
    ("v4l2:///dev/video0", ("v4l2", "/dev/video0")),
    ("v4l2://1", ("v4l2", "1")),
    ("rtsp://cam.local:8554/live", ("rtsp", "rtsp://cam.local:8554/live")),
    ("http://cam.local:8080/video.mjpg", ("http", "http://cam.local:8080/video.mjpg")),
    ("file://clip.mp4", ("file", "clip.mp4")),
    ("file:///data/clip.mp4", ("file", "/data/clip.mp4")),
    ("/dev/video0", ("v4l2", "/dev/video0")),
    ("0", ("v4l2", "0")),
    (2, ("v4l2", "2")),
    ("frames/*.png", ("file", "frames/*.png")),
    ("clip.mp4", ("file", "clip.mp4")),
])
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected


def test_unknown_scheme_lists_schemes():
    with pytest.raises(InputError, match=r"unknown source scheme 'ftp://'.*choices: csi://, v4l2://, rtsp://, http://, "
                                         r"https://, file://"):
        open_source("ftp://example.com/stream")


def test_video_file(clip):
    for uri in (f"file://{clip}", str(clip)):
        with open_source(uri) as src:
            assert isinstance(src, VideoFile) and not src.live
            assert src.fps == pytest.approx(12)
            frames = list(src)
        assert len(frames) == 7
        assert all(f.shape == (24, 32, 3) and f.dtype == np.uint8 for f in frames)
        assert abs(int(frames[3].mean()) - 90) <= 3  # lossy codec
    assert list(src) == []  # ended cleanly, stays ended


def test_image_directory_in_natural_order(png_dir):
    src = open_source(f"file://{png_dir}")
    assert isinstance(src, ImageSequence) and len(src) == 3
    assert [int(f[0, 0, 0]) for f in src] == [20, 40, 200]
    assert [int(f[0, 0, 0]) for f in open_source(str(png_dir))] == [20, 40, 200]


def test_image_glob(png_dir):
    assert [int(f[0, 0, 0]) for f in open_source(f"file://{png_dir}/frame1*.png")] == [20, 200]
    with pytest.raises(InputError, match="matches no files"):
        open_source(f"file://{png_dir}/*.jpg")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.mp4: no such file"):
        open_source(f"file://{tmp_path}/missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(InputError, match="junk.mp4: OpenCV cannot open it as a video"):
        open_source(str(junk))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: directory holds no images"):
        open_source(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        next(open_source(str(bad)))


def test_csi():
    pipeline = csi_pipeline(1, 640, 480, 60, flip=2)
    assert pipeline.startswith("nvarguscamerasrc sensor-id=1 ! ")
    assert "width=(int)640" in pipeline and "framerate=(fraction)60/1" in pipeline and "flip-method=2" in pipeline
    assert pipeline.endswith("appsink drop=true max-buffers=1")
    if not has_gstreamer():
        with pytest.raises(MissingDependency, match="GStreamer"):
            open_source("csi://0")
    with pytest.raises(InputError, match="csi://N"):
        open_source("csi://front")


# -- live sources: reconnect with backoff, against a camera that fails on purpose -----------------

class FlakyCapture:
    """A capture object like cv2.VideoCapture that delivers `frames` frames, then none."""

    def __init__(self, opened: bool, frames: int, start: int):
        self.opened, self.left, self.next = opened, frames, start
        self.released = False

    def isOpened(self) -> bool:
        return self.opened

    def read(self):
        if not self.opened or self.left == 0:
            return False, None
        self.left -= 1
        self.next += 1
        return True, frame(self.next)

    def release(self) -> None:
        self.released = True


class FlakyCamera:
    """A source factory: the first `fail_opens` opens fail, then each open delivers `per_open` frames."""

    def __init__(self, fail_opens: int, per_open: int, raise_on_fail: bool = False):
        self.fail_opens, self.per_open, self.raise_on_fail = fail_opens, per_open, raise_on_fail
        self.opens = 0
        self.delivered = 0
        self.captures: list[FlakyCapture] = []

    def __call__(self) -> FlakyCapture:
        self.opens += 1
        if self.opens <= self.fail_opens:
            if self.raise_on_fail:
                raise OSError("device busy")
            cap = FlakyCapture(False, 0, 0)
        else:
            cap = FlakyCapture(True, self.per_open, self.delivered)
            self.delivered += self.per_open
        self.captures.append(cap)
        return cap


def test_live_source_opens_after_failures_with_exponential_backoff(caplog):
    camera = FlakyCamera(fail_opens=3, per_open=4, raise_on_fail=True)
    sleeps = []
    src = LiveSource(camera, "v4l2:///dev/video9", Backoff(attempts=5, initial=0.25, factor=2, maximum=1.0), sleeps.append)
    with caplog.at_level(logging.WARNING, logger="edgeflow.runtime.sources"):
        first = [int(next(src)[0, 0, 0]) for _ in range(4)]
    assert first == [1, 2, 3, 4]
    assert sleeps == [0.25, 0.5, 1.0]
    assert camera.opens == 4
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "v4l2:///dev/video9: cannot open (device busy); reopening in 0.25 s (attempt 1/5)"
    assert len(messages) == 3


def test_live_source_reopens_a_lost_camera():
    camera = FlakyCamera(fail_opens=0, per_open=3)
    sleeps = []
    src = LiveSource(camera, "csi://0", Backoff(attempts=3, initial=0.1), sleeps.append)
    values = [int(f[0, 0, 0]) for f, _ in zip(src, range(8))]
    assert values == [1, 2, 3, 4, 5, 6, 7, 8]  # continues across two losses
    assert sleeps == [0.1, 0.1]  # the attempt count starts again after each delivered frame
    assert src.reopens == 2
    assert all(c.released for c in camera.captures[:-1])
    src.close()
    assert camera.captures[-1].released
    assert list(src) == []


def test_live_source_gives_up_after_bounded_attempts():
    camera = FlakyCamera(fail_opens=100, per_open=1)
    sleeps = []
    src = LiveSource(camera, "rtsp://cam:8554/x", Backoff(attempts=4, initial=1, factor=3, maximum=5), sleeps.append)
    with pytest.raises(InputError, match=r"^rtsp://cam:8554/x: cannot open; gave up after 4 reopen attempts$"):
        next(src)
    assert sleeps == [1, 3, 5, 5]
    assert camera.opens == 5
    assert all(c.released for c in camera.captures)


def test_real_v4l2_device_that_does_not_exist():
    src = open_source("v4l2:///dev/video-edgeflow-absent", backoff=Backoff(attempts=1, initial=0.001))
    assert src.live
    with pytest.raises(InputError, match="v4l2:///dev/video-edgeflow-absent: cannot open; gave up after 1"):
        next(src)


def test_loop_starts_a_file_source_again(png_dir):
    src = open_source(f"file://{png_dir}", loop=True)
    assert [int(next(src)[0, 0, 0]) for _ in range(7)] == [20, 40, 200, 20, 40, 200, 20]
    assert src.passes == 3 and not src.live
    src.close()
    assert list(src) == []


def test_unlimited_backoff_state_and_close_from_another_thread():
    """Backoff(attempts=None) never gives up; `state` tells the loss; close() ends the wait at once."""
    import threading
    import time

    camera = FlakyCamera(fail_opens=10**9, per_open=1)
    src = LiveSource(camera, "v4l2:///dev/video9", Backoff(attempts=None, initial=30.0))
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(next(src, "ended")))
    reader.start()
    deadline = time.monotonic() + 5
    while src.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.state == "lost: cannot open" and src.failures == 1
    src.close()
    reader.join(timeout=2)
    assert not reader.is_alive() and outcome == ["ended"]
