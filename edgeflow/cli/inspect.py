"""`edgeflow inspect`: per-kernel resources, occupancy and roofline of a compiled package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeflow.cli.options import TRUST_HELP


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)


def inspect_cmd(
    package: Path = typer.Argument(..., metavar="PACKAGE", help="Compiled package .tar."),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="PUBKEY", help=TRUST_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Show what a package holds. CUDA: per kernel registers, spills, shared memory, launch size,
    occupancy, FLOPs, bytes and roofline time on the package's board, summed into a predicted fps
    (a prediction: no board is measured). All: target, precision, accuracy, file sizes,
    parameters and convolution MACs, and what pruning removed."""
    import json

    from edgeflow.inspect import format_report, inspect_package

    report = inspect_package(package, trusted_keys=trust or None)
    typer.echo(json.dumps(report, indent=1) if json_out else format_report(report))
