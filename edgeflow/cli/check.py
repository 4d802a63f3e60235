"""`edgeflow check`: what this device's runtime has, for when a camera will not open.

Prints which OpenCV was loaded (version, path) and whether it has GStreamer (csi:// needs it)
and FFmpeg (rtsp://, http://, video files), whether the TVM runtime imports and sees a CUDA
device, and whether the daemon's extras are installed.
"""

from __future__ import annotations

import importlib.util

import typer


def register(app: typer.Typer) -> None:
    app.command("check")(check_cmd)


def check_cmd() -> None:
    """Which OpenCV, TVM runtime, CUDA device and daemon extras this machine has."""
    from edgeflow.runtime.sources import opencv_info

    cv = opencv_info()
    yes = {True: "yes", False: "no"}
    typer.echo(f"OpenCV {cv['version']} from {cv['path']}: GStreamer {yes[cv['gstreamer']]}, "
               f"FFmpeg {yes[cv['ffmpeg']]}")
    if not cv["gstreamer"]:
        typer.echo("  csi:// cameras need OpenCV with GStreamer: on a Jetson, JetPack's python3-opencv; "
                   "a pip-installed opencv-python shadows it (pip uninstall opencv-python-headless)")
    try:
        import tvm.runtime

        cuda = tvm.runtime.cuda(0).exist
        typer.echo(f"TVM runtime {getattr(tvm, '__version__', '?')}: CUDA device {yes[bool(cuda)]}")
    except ImportError as e:
        typer.echo(f"TVM runtime: missing ({e}); install edgeflow[runtime] or the device image's TVM")
    for module, what in (("aiohttp", "edgeflow serve"), ("prometheus_client", "/metrics"), ("zmq", "zmq:// sinks"),
                         ("pycuda", "pinned CUDA buffers (the jetson extra)")):
        typer.echo(f"{module}: {'installed' if importlib.util.find_spec(module) else 'missing'} ({what})")
