"""`edgeflow run PACKAGE SOURCE`: flow on a video source with a compiled package.

A thin shell over `edgeflow.runtime.load(...).stream(source, sinks=[...])` and `open_sink`:
writes `flow_NNNNN.png` (colour) and `flow_NNNNN.flo` per frame pair into a directory, a
colour-coded video for `file://X.mp4`, or publishes on `zmq://HOST:PORT`, and prints one summary
line with pipeline and network fps. Ctrl-C stops a live source cleanly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeflow.cli.options import TRUST_HELP


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


def run_cmd(
    package: Path = typer.Argument(..., help="Compiled package (.tar) from `edgeflow compile`."),
    source: str = typer.Argument(..., help="csi://0, v4l2:///dev/video0, rtsp://host:port/path, http://host/x.mjpg, "
                                           "file://clip.mp4, a directory or glob of images, /dev/videoN or N."),
    output: Optional[list[str]] = typer.Option(None, "--output", "-o",
                                               help="DIR for flow_NNNNN.png + .flo per pair, file://out.mp4 for a "
                                                    "colour-coded video, zmq://HOST:PORT to publish; repeatable. "
                                                    "Default: write nothing."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="Stop after N flow fields."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: the package's kind)."),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="PUBKEY", help=TRUST_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the network "
                                          "(default: every physical core)."),
    max_flow: Optional[float] = typer.Option(None, "--max-flow", min=0.0,
                                             help="Pixels of full colour saturation (default: each frame's largest)."),
    width: int = typer.Option(1280, "--width", min=1, help="CSI camera: capture width."),
    height: int = typer.Option(720, "--height", min=1, help="CSI camera: capture height."),
    framerate: int = typer.Option(30, "--framerate", min=1, help="CSI camera: frames per second."),
    flip: int = typer.Option(0, "--flip", min=0, max=7, help="CSI camera: nvvidconv flip-method (0-7)."),
    loop: bool = typer.Option(False, "--loop", help="File sources: start again at the end (stop with Ctrl-C)."),
) -> None:
    """Run optical flow on a video source and write colour-coded flow (PNG + .flo, a video, or ZeroMQ)."""
    import edgeflow.runtime as rt
    from edgeflow.runtime.sinks import open_sink
    from edgeflow.runtime.sources import open_source, parse_uri

    parse_uri(source)  # an unknown scheme fails before the package is loaded
    engine = rt.load(package, device=device, trusted_keys=trust or None, threads=threads)
    src = open_source(source, width=width, height=height, framerate=framerate, flip=flip, loop=loop)
    sinks = []
    try:
        sinks = [open_sink(uri, fps=src.fps or 30.0, max_flow=max_flow) for uri in output or ()]
        stats = _run(engine.stream(src, sinks=sinks, max_frames=max_frames), sinks)
    finally:
        src.close()
    s = stats.summary()
    where = f" -> {', '.join(sink.uri for sink in sinks)}" if sinks else ""
    typer.echo(f"{stats.count} flow fields from {source}{where}: pipeline {s['pipeline_fps']:.1f} fps, "
               f"network {s['network_fps']:.1f} fps (per pair: capture {s['capture']:.1f} ms, preprocess "
               f"{s['preprocess']:.1f} ms, network {s['network']:.1f} ms, postprocess {s['postprocess']:.1f} ms)")


def _run(stream, sinks):
    """Drain `stream` into `sinks`: completed at the end or on Ctrl-C, dropped on an error."""
    try:
        stats = stream.run()
    except KeyboardInterrupt:
        stats = stream.stats
    except BaseException:
        stream.close()
        for sink in sinks:
            sink.abort()
        raise
    finally:
        stream.close()
    for sink in sinks:
        sink.close()
    return stats
