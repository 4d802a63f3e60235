"""`edgeflow run PACKAGE SOURCE`: flow on a video source with a compiled package.

A thin shell over `edgeflow.runtime.load(...).stream(...)`: writes `flow_NNNNN.png` (colour) and
`flow_NNNNN.flo` per frame pair into a directory, or a colour-coded video for `file://X.mp4`,
and prints one summary line with pipeline and network fps. Ctrl-C stops a live source cleanly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

VIDEO_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}
TRUST_HELP = ("Refuse the package unless signed by this Ed25519 public key (repeatable; "
              "default: the files in $EDGEFLOW_TRUSTED_KEYS).")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


def run_cmd(
    package: Path = typer.Argument(..., help="Compiled package (.tar) from `edgeflow compile`."),
    source: str = typer.Argument(..., help="csi://0, v4l2:///dev/video0, rtsp://host:port/path, file://clip.mp4, "
                                           "a directory or glob of images, /dev/videoN or N."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="DIR for flow_NNNNN.png + .flo per pair, or file://out.mp4 for a "
                                              "colour-coded video. Default: write nothing."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="Stop after N flow fields."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: the package's kind)."),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="PUBKEY", help=TRUST_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the network "
                                          "(default: every physical core)."),
    max_flow: Optional[float] = typer.Option(None, "--max-flow", min=0.0,
                                             help="Pixels of full colour saturation (default: each frame's largest)."),
) -> None:
    """Run optical flow on a video source and write colour-coded flow (PNG + .flo, or a video)."""
    import edgeflow.runtime as rt
    from edgeflow.runtime.sources import open_source, parse_uri

    parse_uri(source)  # an unknown scheme fails before the package is loaded
    engine = rt.load(package, device=device, trusted_keys=trust or None, threads=threads)
    src = open_source(source)
    try:
        sink = _sink(output, fps=src.fps or 30.0, max_flow=max_flow)
        stats = _run(engine, src, sink, max_frames)
    finally:
        src.close()
    s = stats.summary()
    where = f" -> {sink.describe()}" if output else ""
    typer.echo(f"{stats.count} flow fields from {source}{where}: pipeline {s['pipeline_fps']:.1f} fps, "
               f"network {s['network_fps']:.1f} fps (per pair: capture {s['capture']:.1f} ms, preprocess "
               f"{s['preprocess']:.1f} ms, network {s['network']:.1f} ms, postprocess {s['postprocess']:.1f} ms)")


def _run(engine, src, sink, max_frames: int | None):
    """Stream `src` through `engine` into `sink`; Ctrl-C ends the stream and keeps what was written."""
    from edgeflow.runtime.pipeline import Stats

    stats = Stats()
    results = engine.stream(src, max_frames=max_frames)
    try:
        for r in results:
            sink.write(r.index, r.flow)
            stats.add(r)
    except KeyboardInterrupt:
        pass
    except BaseException:
        sink.abort()
        raise
    finally:
        results.close()
    sink.close()
    return stats


def _sink(output: str | None, *, fps: float, max_flow: float | None):
    if output is None:
        return _NullSink()
    path = output[len("file://"):] if output.startswith("file://") else output
    path = Path(os.path.expanduser(path))
    if path.suffix.lower() in VIDEO_FOURCC:
        return _VideoSink(path, fps, max_flow)
    return _DirSink(path, max_flow)


class _NullSink:
    def describe(self) -> str:
        return "nothing"

    def write(self, index, flow) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _DirSink(_NullSink):
    """flow_NNNNN.png (colour) and flow_NNNNN.flo per pair, each written atomically."""

    def __init__(self, directory: Path, max_flow: float | None):
        from edgeflow.errors import InputError

        if directory.exists() and not directory.is_dir():
            raise InputError(f"{directory}: exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.max_flow = directory, max_flow

    def describe(self) -> str:
        return f"{self.directory}/flow_NNNNN.png + .flo"

    def write(self, index, flow) -> None:
        import cv2

        from edgeflow.errors import InputError
        from edgeflow.flow_io import write_atomic, write_flow
        from edgeflow.visualize import flow_to_color

        stem = self.directory / f"flow_{index:05d}"
        write_flow(stem.with_suffix(".flo"), flow)
        ok, png = cv2.imencode(".png", flow_to_color(flow, self.max_flow))
        if not ok:
            raise InputError(f"{stem}.png: OpenCV could not encode the image")
        write_atomic(stem.with_suffix(".png"), png.tobytes())


class _VideoSink(_NullSink):
    """A colour-coded flow video, written to a temporary name and renamed when complete."""

    def __init__(self, path: Path, fps: float, max_flow: float | None):
        from edgeflow.errors import InputError

        if path.is_dir():
            raise InputError(f"{path}: is a directory (a video name ends in {', '.join(VIDEO_FOURCC)})")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps, self.max_flow = path, fps, max_flow
        self.tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
        self.writer = None

    def describe(self) -> str:
        return str(self.path)

    def write(self, index, flow) -> None:
        import cv2

        from edgeflow.errors import InputError
        from edgeflow.visualize import flow_to_color

        img = flow_to_color(flow, self.max_flow)
        if self.writer is None:
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()])
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, (img.shape[1], img.shape[0]))
            if not self.writer.isOpened():
                self.writer = None
                raise InputError(f"{self.path}: OpenCV cannot write this video format")
        self.writer.write(img)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.tmp.unlink(missing_ok=True)
