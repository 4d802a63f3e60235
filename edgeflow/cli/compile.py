"""`edgeflow compile [MODEL] --target T`: a thin shell over `edgeflow.compile.compile`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)


def compile_cmd(
    model: str = typer.Argument("flownet2-s", help="Registry name (see `edgeflow models`)."),
    target: str = typer.Option("jetson", "--target", "-t", help="Board or CPU (see `edgeflow targets`)."),
    weights: str = typer.Option("default", help="default (shipped), a checkpoint shipped beside it (see "
                                                "`edgeflow models`), random (untrained), or a weight file."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8 (calibrated on --calib or generated pairs; "
                                               "VNNI on x86, dp4a on Jetsons)."),
    prune: float = typer.Option(0.0, help="Share of channels to remove (structured pruning, then "
                                           "distillation; see `edgeflow prune`)."),
    calib: str = typer.Option(None, "--calib", help="Directory of your own video frames to distil the "
                                                    "pruned net and calibrate int8 on (default: generated pairs)."),
    max_epe_increase: float = typer.Option(0.05, "--max-epe-increase",
                                           help="With --prune or int8: refuse (exit 5, nothing written) when the EPE "
                                                "against ground truth grows by more than this share (0.05 = 5 %)."),
    size: str = typer.Option("448x1024", help="Network input size HxW, multiples of 64."),
    out: str = typer.Option(None, "-o", "--out", help="Package path (default: MODEL-TARGET-PRECISION-HxW.tar)."),
    force: bool = typer.Option(False, help="Write the package even if its EPE exceeds the tolerance or "
                                           "--max-epe-increase."),
    sign: Path = typer.Option(None, "--sign", metavar="KEY",
                              help="Sign the package with this Ed25519 private key (`edgeflow keygen`)."),
    tuning_db: str = typer.Option(None, "--tuning-db", metavar="DIR",
                                  help="Apply this `edgeflow tune` database where it beats the hand schedules."),
) -> None:
    """Compile MODEL for TARGET into a self-describing package (.tar)."""
    import time

    from edgeflow.cli.options import parse_size
    from edgeflow.compile import compile
    from edgeflow.models import spec

    spec(model)
    if weights == "random":
        typer.echo(f"warning: compiling {model} with random (untrained) weights", err=True)
    t0 = time.time()
    result = compile(model, target=target, input_size=parse_size(size), precision=precision, prune=prune,
                     calibration=calib, out=out, weights=weights, force=force, sign=sign, tuning_db=tuning_db,
                     max_epe_increase=max_epe_increase,
                     progress=lambda msg: typer.echo(f"[{time.time() - t0:6.1f}s] {msg}", err=True))
    typer.echo(result.summary())
