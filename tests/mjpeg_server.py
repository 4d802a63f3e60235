"""A loopback HTTP MJPEG camera for tests: serves `frames` as multipart/x-mixed-replace at `fps`,
like an IP camera; `stop()` drops every connection, `start()` serves again on the same port."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2


class MjpegCamera:
    def __init__(self, frames, fps: float = 20.0, port: int = 0):
        self.jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        self.fps = fps
        self.port = port
        self._server = None
        self._running = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cam.mjpg"

    def start(self) -> "MjpegCamera":
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while camera._running.is_set():
                        jpeg = camera.jpegs[i % len(camera.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        self.wfile.flush()
                        i += 1
                        time.sleep(1 / camera.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._running.set()
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._running.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        time.sleep(0.2)  # the handlers see the flag and close their connections
