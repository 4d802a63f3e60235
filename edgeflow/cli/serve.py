"""`edgeflow serve PACKAGE --source URI`: the camera daemon (HTTP page, MJPEG, flow, status, metrics).

A thin shell over `edgeflow.runtime.serve.serve(Settings.load(...))`: flags override the TOML
config, which overrides the defaults. Prints the URL once listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeflow.cli.options import TRUST_HELP


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)


def serve_cmd(
    package: Path = typer.Argument(..., help="Compiled package (.tar) from `edgeflow compile`."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Video source URI (csi://0, v4l2:///dev/video0, "
                                                                     "rtsp://..., http://..., file://clip.mp4)."),
    host: Optional[str] = typer.Option(None, "--host",
                                       help="Address to bind (default 127.0.0.1; others need a token)."),
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535, help="TCP port (default 8080; 0: any free)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="EDGEFLOW_TOKEN",
                                        help="Token required on every endpoint but /healthz (Bearer header or "
                                             "?token=). Also $EDGEFLOW_TOKEN."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with any of the settings (flags win)."),
    loop: bool = typer.Option(False, "--loop", help="File sources: start again at the end."),
    sink: Optional[list[str]] = typer.Option(None, "--sink", help="Extra output, e.g. zmq://0.0.0.0:5555; repeatable."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: the package's kind)."),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="PUBKEY", help=TRUST_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the network "
                                          "(default: every physical core)."),
    width: Optional[int] = typer.Option(None, "--width", min=1, help="CSI camera: capture width (default 1280)."),
    height: Optional[int] = typer.Option(None, "--height", min=1, help="CSI camera: capture height (default 720)."),
    framerate: Optional[int] = typer.Option(None, "--framerate", min=1, help="CSI camera: frames per second (30)."),
    flip: Optional[int] = typer.Option(None, "--flip", min=0, max=7, help="CSI camera: nvvidconv flip-method."),
) -> None:
    """Serve live optical flow over HTTP: page, MJPEG, /flow.npy, /status, /metrics, /healthz."""
    import sys

    # The daemon needs no torch, but tvm_ffi imports it wherever it is installed: here 3 s more to
    # start, 1 s more to exit under load and hundreds of MB. Kept out, as on the device.
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
    from edgeflow.runtime.serve.daemon import Settings, serve

    settings = Settings.load(config, package=str(package), source=source, host=host, port=port, token=token,
                             loop=loop or None, sinks=sink or None, device=device,
                             trust=[str(k) for k in trust] if trust else None, threads=threads,
                             width=width, height=height,
                             framerate=framerate, flip=flip)

    def ready(url: str) -> None:
        typer.echo(f"edgeflow serve: {url} ({settings.source} through {package.name}; stop with Ctrl-C)")
        sys.stdout.flush()

    serve(settings, ready=ready)
