"""The daemon, as a real process on loopback: endpoints, Prometheus metrics, ZeroMQ against
/flow.npy, a file source's end, a live source that vanishes and returns, the token, systemd's
notify protocol, SIGTERM, and the page in headless chromium."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from edgeflow.errors import InputError

pytestmark = pytest.mark.tvm
pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

STARTUP_S = 120  # importing TVM and loading the package, on a busy 2-core machine


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """8 generated frames (72x112 PNG) of one continuous scene."""
    from edgeflow.synth import video_frames

    d = tmp_path_factory.mktemp("serve-clip")
    frames = []
    for i, (img, _) in enumerate(video_frames(np.random.default_rng(11), 8, (72, 112))):
        cv2.imwrite(str(d / f"frame_{i:03d}.png"), img)
        frames.append(img)
    return d, frames


class Served:
    """`edgeflow serve ...` in its own process group; `url` once it listens."""

    def __init__(self, tmp_path, *args: str, env: dict | None = None):
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        code = "import sys; from edgeflow.cli import main; sys.exit(main())"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", *args], stdout=subprocess.PIPE,
                                     stderr=open(self.log, "w", encoding="utf-8"), encoding="utf-8",
                                     errors="replace", start_new_session=True,
                                     env={**os.environ, **(env or {})})
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_S)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"the daemon did not start: {self.log_text()[-3000:]}") from None
        match = re.search(r"(http://\S+/)", line)
        assert match, line + self.log_text()[-3000:]
        self.url = match.group(1)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, token: str | None = None, timeout: float = 10.0):
        """(status, headers, body) of GET `path`."""
        request = urllib.request.Request(self.url + path.lstrip("/"))
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def status(self, token: str | None = None) -> dict:
        code, _, body = self.get("/status", token)
        assert code == 200, body
        return json.loads(body)

    def wait_for(self, predicate, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None, f"the daemon exited: {self.log_text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {self.get('/status')[2][:2000]!r}")

    def stop(self) -> float:
        """SIGTERM; seconds until the process exited."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def looping(host_package, clip, tmp_path_factory):
    """A daemon over the clip with --loop, publishing on ZeroMQ too."""
    zmq_port = free_port()
    served = Served(tmp_path_factory.mktemp("serve"), str(host_package), "--source", f"file://{clip[0]}", "--loop",
                    "--port", "0", "--sink", f"zmq://127.0.0.1:{zmq_port}")
    served.zmq_endpoint = f"tcp://127.0.0.1:{zmq_port}"
    served.wait_for(lambda: served.get("/healthz")[0] == 200, "a healthy daemon")
    yield served
    served.stop()


def test_status_flow_and_page(looping):
    s1 = looping.status()
    assert s1["healthy"] and s1["state"] == "streaming" and s1["source"]["live"] is False
    assert s1["opencv"]["gstreamer"] in (True, False) and s1["opencv"]["version"] == cv2.__version__
    assert s1["package"]["input"] == "64x128" and s1["fps"]["network"] > 0 and s1["fps"]["pipeline"] > 0
    assert set(s1["stages_ms"]) == {"capture", "preprocess", "network", "postprocess"}
    looping.wait_for(lambda: looping.status()["frames"] > s1["frames"] + 8, "the loop to go on")  # past the clip's end
    code, headers, body = looping.get("/flow.npy")
    assert code == 200 and int(headers["X-Edgeflow-Frame"]) >= 1
    flow = np.load(io.BytesIO(body), allow_pickle=False)
    assert flow.shape == (72, 112, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
    code, headers, page = looping.get("/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert b"stream.mjpg" in page and b"status" in page
    assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external assets
    code, _, body = looping.get("/healthz")
    assert (code, body) == (200, b"ok\n")


def read_jpegs(response, count: int) -> list[np.ndarray]:
    jpegs = []
    while len(jpegs) < count:
        assert response.readline() == b"--frame\r\n"
        head = {}
        while (line := response.readline().strip()):
            key, _, value = line.decode().partition(":")
            head[key.lower()] = value.strip()
        jpeg = response.read(int(head["content-length"]))
        assert response.read(2) == b"\r\n" and head["content-type"] == "image/jpeg"
        jpegs.append(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    return jpegs


def test_mjpeg_stream_sends_new_jpegs(looping):
    with urllib.request.urlopen(looping.url + "stream.mjpg", timeout=10) as r:
        assert r.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=frame"
        jpegs = read_jpegs(r, 3)
    assert all(j.shape == (72, 224, 3) for j in jpegs)  # camera | flow
    assert any(not np.array_equal(jpegs[0], j) for j in jpegs[1:])


def test_each_preview_is_encoded_once_for_all_viewers(looping):
    viewers = [urllib.request.urlopen(looping.url + "stream.mjpg", timeout=10) for _ in range(4)]
    try:
        looping.wait_for(lambda: looping.status()["viewers"] >= 4, "four viewers")
        s0 = looping.status()
        threads = [threading.Thread(target=read_jpegs, args=(v, 5)) for v in viewers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        s1 = looping.status()
    finally:
        for v in viewers:
            v.close()
    encoded = s1["previews_encoded"] - s0["previews_encoded"]
    assert 2 <= encoded <= s1["frames"] - s0["frames"] + 1  # at most one per flow field, not one per viewer
    assert encoded <= 15 * (s1["uptime_s"] - s0["uptime_s"]) + 1  # the default cap, preview_fps = 15


def test_preview_colours_are_flow_to_color():
    """The preview's table-driven colour coding against the numpy Middlebury one."""
    from edgeflow.runtime.serve.preview import colour_flow
    from edgeflow.visualize import flow_to_color

    rng = np.random.default_rng(3)
    for scale in (0.01, 4.0, 300.0):
        flow = cv2.resize(rng.normal(0, scale, (12, 16, 2)).astype(np.float32), (320, 240))
        flow[0, 0] = 0  # zero flow: white; and the wheel's seam at angle 0 / 2 pi
        flow[0, 1] = (1, 0)
        flow[0, 2] = (1, -1e-6)
        got, expected = colour_flow(flow).astype(int), flow_to_color(flow).astype(int)
        assert got.shape == expected.shape == (240, 320, 3)
        assert np.abs(got - expected).max() <= 1, scale


def test_metrics_parse(looping):
    from prometheus_client.parser import text_string_to_metric_families

    code, headers, body = looping.get("/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert all(name.startswith("edgeflow_") for name in families)
    assert families["edgeflow_stage_seconds"].type == "histogram"
    counts = {s.labels["stage"]: s.value for s in families["edgeflow_stage_seconds"].samples
              if s.name == "edgeflow_stage_seconds_count"}
    frames = families["edgeflow_frames"].samples[0].value
    assert set(counts) == {"capture", "preprocess", "network", "postprocess"} and frames > 0
    assert counts["network"] >= frames - 1  # observed per flow field (a scrape may fall between the two)
    network_sum = [s.value for s in families["edgeflow_stage_seconds"].samples
                   if s.name == "edgeflow_stage_seconds_sum" and s.labels["stage"] == "network"][0]
    assert 0 < network_sum / counts["network"] < 10  # seconds, not milliseconds
    assert families["edgeflow_source_up"].samples[0].value == 1
    assert families["edgeflow_frames_dropped"].type == "counter"
    assert families["edgeflow_info"].samples[0].labels["input"] == "64x128"


def test_zmq_flow_equals_flow_npy(looping):
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(looping.zmq_endpoint)
    received = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sub.poll(100):
                header, payload = sub.recv_multipart()
                meta = json.loads(header)
                assert meta["dtype"] == "float32" and meta["units"] == "pixels"
                received[meta["frame"]] = np.frombuffer(payload, np.float32).reshape(meta["shape"])
            if len(received) >= 3:
                code, headers, body = looping.get("/flow.npy")
                frame = int(headers["X-Edgeflow-Frame"])
                if frame in received:
                    np.testing.assert_array_equal(np.load(io.BytesIO(body)), received[frame])
                    return
        raise AssertionError(f"no /flow.npy frame among the {len(received)} received over ZeroMQ")
    finally:
        sub.close()


def test_token_required_beyond_loopback(host_package, clip, tmp_path):
    code = "import sys; from edgeflow.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "serve", str(host_package), "--source", str(clip[0]),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=STARTUP_S)
    assert proc.returncode == InputError.exit_code
    assert proc.stderr.strip() == "Error: host '0.0.0.0' is beyond loopback: a token is required (token=...)"

    served = Served(tmp_path, str(host_package), "--source", str(clip[0]), "--loop", "--host", "0.0.0.0",
                    "--port", "0", "--token", "s3cret")
    try:
        served.url = re.sub(r"//[^/]+:", "//127.0.0.1:", served.url)
        for path in ("/", "/status", "/metrics", "/flow.npy", "/stream.mjpg"):
            assert served.get(path)[0] == 401, path
            assert served.get(path, token="wrong")[0] == 401, path
        assert served.get("/healthz")[0] in (200, 503)  # never needs the token
        served.wait_for(lambda: served.get("/healthz")[0] == 200, "a healthy daemon")
        assert served.status(token="s3cret")["healthy"]
        assert served.get("/status?token=s3cret")[0] == 200
        assert served.get("/flow.npy", token="s3cret")[0] == 200
    finally:
        served.stop()


def test_file_source_ends_systemd_notify_and_sigterm(host_package, clip, tmp_path):
    """Without --loop the stream ends: the last result stays served, /healthz says 503 and why.
    READY=1 and WATCHDOG=1 reach $NOTIFY_SOCKET; SIGTERM stops the daemon within 2 s."""
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.2)
    served = Served(tmp_path, str(host_package), "--source", f"file://{clip[0]}", "--port", "0",
                    env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"})
    try:
        served.wait_for(lambda: served.status()["state"] == "ended", "the end of the clip")
        s = served.status()
        assert s["frames"] == 7 and s["frame_id"] == 7 and not s["healthy"]
        code, _, reason = served.get("/healthz")
        assert code == 503 and reason.startswith(b"stream ended: the file source reached its end")
        assert served.get("/flow.npy")[0] == 200
        with urllib.request.urlopen(served.url + "stream.mjpg", timeout=10) as r:  # the last preview still comes
            assert r.readline() == b"--frame\r\n"
        messages = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (any("READY=1" in m for m in messages)
                                                   and any("WATCHDOG=1" in m for m in messages)):
            try:
                messages.append(notify.recv(4096).decode())
            except socket.timeout:
                pass
        assert any(m.startswith("READY=1") for m in messages), messages
        assert any(m.startswith("WATCHDOG=1") for m in messages), messages
        slow_viewer = socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1].strip("/"))))
        slow_viewer.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        time.sleep(0.5)
        assert served.stop() < 2.0
        assert served.proc.returncode == 0, served.log_text()[-2000:]
        slow_viewer.close()
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
        assert any(m.startswith("STOPPING=1") for m in messages)
    finally:
        served.stop()
        notify.close()


def test_live_source_vanishes_and_returns(host_package, clip, tmp_path):
    """An HTTP MJPEG camera stops: the daemon stays up with /healthz 503, reopens with backoff,
    and is healthy again when the camera returns; the reconnect is counted."""
    from mjpeg_server import MjpegCamera

    camera = MjpegCamera(clip[1], fps=15).start()
    config = tmp_path / "serve.toml"
    config.write_text("reconnect_initial = 0.2\nreconnect_max = 0.5\nstall_timeout = 3.0\n")
    served = Served(tmp_path, str(host_package), "--source", camera.url, "--port", "0", "--config", str(config))
    try:
        served.wait_for(lambda: served.get("/healthz")[0] == 200, "a healthy daemon")
        assert served.status()["source"]["live"]
        camera.stop()
        code, _, reason = served.wait_for(lambda: (r := served.get("/healthz"))[0] == 503 and r, "503 after the loss")
        assert b"lost" in reason or b"no flow field" in reason, reason
        time.sleep(1.0)
        assert served.proc.poll() is None and served.get("/healthz")[0] == 503
        assert served.status()["source"]["failures"] >= 1
        camera.start()
        served.wait_for(lambda: served.get("/healthz")[0] == 200, "recovery")
        s = served.status()
        assert s["source"]["reconnects"] >= 1 and s["source"]["state"] == "streaming"
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(served.get("/metrics")[2].decode())}
        assert families["edgeflow_source_reconnects"].samples[0].value >= 1
    finally:
        served.stop()
        camera.stop()


def test_file_source_removed_and_restored(host_package, clip, tmp_path):
    """The looping clip's directory vanishes mid-stream: the daemon stays up with /healthz 503 and
    why, starts the stream again with backoff, and is healthy again once the files are back."""
    import shutil

    frames = tmp_path / "frames"
    shutil.copytree(clip[0], frames)
    config = tmp_path / "serve.toml"
    config.write_text("reconnect_initial = 0.2\nreconnect_max = 0.5\nstall_timeout = 3.0\n")
    served = Served(tmp_path, str(host_package), "--source", f"file://{frames}", "--loop", "--port", "0",
                    "--config", str(config))
    try:
        served.wait_for(lambda: served.get("/healthz")[0] == 200, "a healthy daemon")
        frames.rename(tmp_path / "away")
        code, _, reason = served.wait_for(lambda: (r := served.get("/healthz"))[0] == 503 and r, "503 after the loss")
        assert b"stream failed" in reason and b"starting it again" in reason, reason
        time.sleep(1.0)
        assert served.proc.poll() is None and served.get("/healthz")[0] == 503
        assert served.get("/flow.npy")[0] == 200  # the last flow field stays served
        before = served.status()["frames"]
        (tmp_path / "away").rename(frames)
        served.wait_for(lambda: served.get("/healthz")[0] == 200, "recovery")
        s = served.status()
        assert s["restarts"] >= 1 and s["frames"] > before and s["state"] == "streaming"
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(served.get("/metrics")[2].decode())}
        assert families["edgeflow_stream_restarts"].samples[0].value >= 1
    finally:
        served.stop()


def chromium_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return chromium, driver


@pytest.mark.browser
def test_page_in_headless_chromium(looping):
    """The page shows the frame counter going up and the preview image changing."""
    chromium, driver = chromium_paths()
    if not chromium or not driver:
        pytest.skip("chromium and chromedriver are not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,700"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(looping.url)

        def frames() -> int:
            text = browser.find_element("id", "frames").text
            return int(text) if text.isdigit() else 0

        looping.wait_for(lambda: frames() > 0, "the page's frame counter")
        first_count = frames()
        view = browser.find_element("id", "view")
        looping.wait_for(lambda: browser.execute_script("return arguments[0].naturalWidth", view) > 0,
                         "the preview image")
        first = view.screenshot_as_png
        looping.wait_for(lambda: frames() > first_count, "the counter to go up")
        looping.wait_for(lambda: view.screenshot_as_png != first, "the preview to change", timeout=30)
        assert browser.execute_script("return arguments[0].naturalWidth", view) == 224
        assert browser.find_element("id", "health").text == "ok"
    finally:
        browser.quit()
