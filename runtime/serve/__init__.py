"""The camera daemon behind `edgeflow serve`: an aiohttp app over a pipelined stream.

    from edgeflow.runtime.serve import serve
    serve("flownet2-s.tar", "csi://0", host="127.0.0.1", port=8080)   # blocks until SIGTERM/SIGINT

Endpoints: `/` (page), `/stream.mjpg`, `/flow.npy`, `/status`, `/metrics`, `/healthz`; see `app`.
Needs the `serve` extra (aiohttp, prometheus-client, pyzmq): `pip install 'edgeflow[runtime]'`.
"""

from __future__ import annotations


def __getattr__(name: str):  # lazy: aiohttp is imported only when the daemon is used
    if name in ("serve", "Daemon", "Settings"):
        from edgeflow.runtime.serve import daemon

        return getattr(daemon, name)
    raise AttributeError(f"module 'edgeflow.runtime.serve' has no attribute {name!r}")
