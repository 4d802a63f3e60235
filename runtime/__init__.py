"""The device side: load a compiled package and run optical flow on image pairs and video streams.

    engine = edgeflow.runtime.load("flownet2-s.tar")     # verifies digests, signature, format, target
    flow = engine(img1, img2)                            # uint8 BGR/gray -> float32 HxWx2 pixels
    for r in engine.stream("csi://0"):                   # r.frame, r.flow, r.timings, r.network_fps
        ...
    engine.stream("file://clip.mp4", sinks=["file://flow.mp4", "zmq://127.0.0.1:5555"]).run()

Imports only numpy, OpenCV and the TVM runtime: no torch, no TVM compiler is needed here.
"""

from __future__ import annotations

import os

__all__ = ["load", "Engine", "read_package", "open_source", "open_sink", "stream", "Stream", "Result", "Stats"]


def load(path: str | os.PathLike, device: str | None = None, *, trusted_keys=None, threads: int | None = None):
    """The Engine of the package at `path` on `device` ("cpu", "cuda", "cuda:N"; None = the
    package's kind). trusted_keys: Ed25519 public keys (PEM paths, PEM bytes or key objects) of
    which one must have signed the package; None: $EDGEFLOW_TRUSTED_KEYS, or no trust check.
    threads: CPU threads of the network (None: every physical core this process may use).
    PackageError, before any library is loaded, if the package is damaged, forged, not signed by
    a trusted key where trust is configured, of an unknown format, or for a target this machine
    cannot run."""
    from edgeflow.runtime.engine import Engine
    from edgeflow.runtime.format import read_package

    pkg = read_package(path, device=device, trusted_keys=trusted_keys)
    return Engine(pkg.manifest, pkg.directory, device, signer=pkg.signer, threads=threads)


def __getattr__(name: str):  # lazy: `import edgeflow.runtime` stays cheap
    if name == "Engine":
        from edgeflow.runtime.engine import Engine as value
    elif name == "read_package":
        from edgeflow.runtime.format import read_package as value
    elif name == "open_source":
        from edgeflow.runtime.sources import open_source as value
    elif name == "open_sink":
        from edgeflow.runtime.sinks import open_sink as value
    elif name in ("stream", "Stream", "Result", "Stats"):
        from edgeflow.runtime import pipeline

        value = getattr(pipeline, name)
    else:
        raise AttributeError(f"module 'edgeflow.runtime' has no attribute {name!r}")
    return value
