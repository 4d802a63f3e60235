"""`edgeflow synth OUT_DIR --count N`: synthetic training/calibration data with exact flow."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("synth")(synth_cmd)


def synth_cmd(
    out_dir: str = typer.Argument(..., help="Output directory (created if missing)."),
    count: int = typer.Option(..., "--count", help="Pairs to write, or frames with --video."),
    size: str = typer.Option("384x512", "--size", help="Image size HxW."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes the same bytes."),
    video: bool = typer.Option(False, "--video", help="Write one continuous clip (clip.mp4, frames/, flow/)."),
    fps: float = typer.Option(30.0, "--fps", help="Frame rate of the clip (with --video)."),
    style: str = typer.Option("chairs", "--style",
                              help="Pairs: chairs (FlyingChairs-like) or natural (photographs, camera effects)."),
) -> None:
    """Write FlyingChairs-like pairs (NNNNN_img1.png, NNNNN_img2.png, NNNNN_flow.flo) or a clip."""
    import time

    from edgeflow.cli.options import parse_size
    from edgeflow.errors import InputError
    from edgeflow.synth import STYLES, write_chairs, write_video

    h, w = parse_size(size)
    if h < 16 or w < 16:
        raise InputError(f"--size {size!r}: expected at least 16x16")
    if video and (h % 2 or w % 2):
        raise InputError(f"--size {size!r}: --video needs an even height and width, e.g. 384x512")
    if count < 1:
        raise InputError(f"--count {count}: expected a positive integer")
    if style not in STYLES:
        raise InputError(f"--style {style!r}: expected one of {', '.join(STYLES)}")
    if video and style != "chairs":
        raise InputError(f"--style {style}: clips (--video) are drawn in the chairs style only")
    if not fps > 0:
        raise InputError(f"--fps {fps}: expected a positive frame rate")
    t0 = time.perf_counter()
    if video:
        out = write_video(out_dir, count, size=(h, w), seed=seed, fps=fps)
        what = "frames"
    else:
        out = write_chairs(out_dir, count, size=(h, w), seed=seed, style=style)
        what = "pairs"
    dt = time.perf_counter() - t0
    typer.echo(f"wrote {count} {what} of {h}x{w} to {out} in {dt:.1f} s ({count / dt:.1f} {what}/s)")
