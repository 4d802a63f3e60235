"""The daemon's aiohttp app: the endpoints, the token check and the MJPEG fan-out.

    /             the page (page.html: camera and colour flow side by side, live stats; no external assets)
    /stream.mjpg  multipart/x-mixed-replace JPEGs of the preview, one per new result, at most preview_fps a second
    /flow.npy     the latest flow (float32 HxWx2, pixels) as .npy; headers X-Edgeflow-Frame, -Timestamp
    /status       JSON: state, health, fps, stage means, drops, reconnects, package, OpenCV
    /metrics      Prometheus text format
    /healthz      200 "ok" while flow fields come, 503 with the reason otherwise (never needs the token)

With a token every endpoint but /healthz needs `Authorization: Bearer TOKEN` or `?token=TOKEN`.
MJPEG writes are awaited, so a viewer that stops reading holds at most its socket buffers: it
gets fewer frames, the others are not slowed and the daemon's memory does not grow.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
from pathlib import Path

import numpy as np
from aiohttp import web

PAGE = Path(__file__).with_name("page.html")
BOUNDARY = "frame"


class Hub:
    """Wakes MJPEG handlers when a result arrives (called from the daemon's thread) or on close,
    and frames each preview as a multipart part once for all of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.closed = False
        self._event = asyncio.Event()
        self._part: tuple[int, bytes] = (-1, b"")

    def part(self, count: int, jpeg: bytes) -> bytes:
        """The multipart part of preview number `count` (its boundary, headers and JPEG)."""
        if self._part[0] != count:
            head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
            self._part = (count, head + jpeg + b"\r\n")
        return self._part[1]

    def wake_threadsafe(self) -> None:
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def close(self) -> None:
        self.closed = True
        self._wake()


def make_app(daemon) -> web.Application:
    """The app over `daemon` (a `Daemon`); call inside the running event loop."""
    app = web.Application(middlewares=[_auth(daemon.settings.token)])
    hub = Hub(asyncio.get_running_loop())
    daemon.on_result = hub.wake_threadsafe
    app["daemon"], app["hub"] = daemon, hub
    app.router.add_get("/", _page)
    app.router.add_get("/stream.mjpg", _mjpeg)
    app.router.add_get("/flow.npy", _flow)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app


def _auth(token: str | None):
    @web.middleware
    async def check_token(request: web.Request, handler):
        if token and request.path != "/healthz":
            header = request.headers.get("Authorization", "")
            given = header[len("Bearer "):] if header.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise web.HTTPUnauthorized(text="token required: Authorization: Bearer TOKEN, or ?token=TOKEN\n",
                                           headers={"WWW-Authenticate": 'Bearer realm="edgeflow"'})
        return await handler(request)

    return check_token


async def _page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def _mjpeg(request: web.Request) -> web.StreamResponse:
    daemon, hub = request.app["daemon"], request.app["hub"]
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                           "Cache-Control": "no-cache, no-store", "Pragma": "no-cache"})
    await response.prepare(request)
    transport = request.transport
    daemon.viewer_transports.add(transport)
    sent = -1
    try:
        while not hub.closed:
            count, jpeg = daemon.cached_preview() or await loop.run_in_executor(None, daemon.preview_jpeg)
            if jpeg is not None and count != sent:
                await response.write(hub.part(count, jpeg))  # awaited: a slow viewer waits here, alone
                sent = count
            due = daemon.preview_due_in()
            if due > 0:  # the cap: no new preview before then, whatever the results
                await asyncio.sleep(due)
            elif jpeg is None or daemon.latest()[0] == sent:
                await hub.wait()  # for a newer result
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        daemon.viewer_transports.discard(transport)
    return response


async def _flow(request: web.Request) -> web.Response:
    _, result = request.app["daemon"].latest()
    if result is None:
        raise web.HTTPServiceUnavailable(text="no flow field yet\n")
    buf = io.BytesIO()
    np.save(buf, result.flow, allow_pickle=False)
    return web.Response(body=buf.getvalue(), content_type="application/octet-stream",
                        headers={"X-Edgeflow-Frame": str(result.frame_id), "X-Edgeflow-Index": str(result.index),
                                 "X-Edgeflow-Timestamp": repr(result.timestamp), "Cache-Control": "no-cache"})


async def _status(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(request.app["daemon"].status()), content_type="application/json",
                        headers={"Cache-Control": "no-cache"})


async def _metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return web.Response(body=request.app["daemon"].metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    healthy, reason = request.app["daemon"].health()
    return web.Response(text=reason + "\n", status=200 if healthy else 503, headers={"Cache-Control": "no-cache"})
