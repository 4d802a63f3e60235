"""`edgeflow eval`: accuracy (EPE, KITTI Fl-all) and time of a method on evaluation data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeflow.cli.options import TRUST_HELP


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def eval_cmd(
    method: str = typer.Argument(..., metavar="MODEL|PACKAGE",
                                 help="OpenCV baseline (dis-ultrafast, dis-fast, dis-medium, dis-fine, farneback), "
                                      "registry model name, or compiled package .tar."),
    data: Path = typer.Option(..., "--data", help="Evaluation data directory (realflow, Sintel, KITTI, ...)."),
    weights: str = typer.Option("default", "--weights",
                                help="For a registry model: 'default', 'random' (untrained) or a weight file."),
    size: str = typer.Option(None, "--size", help="For a registry model: run the network at HxW (multiples of 64), "
                                                  "e.g. a package's compiled size; default: each image's size rounded up."),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="PUBKEY", help=TRUST_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Measure end-point error per evaluation set (and Fl-all on KITTI)."""
    import json

    from edgeflow.errors import InputError
    from edgeflow.evaluate import evaluate

    from edgeflow.cli.options import parse_size

    net_size = parse_size(size) if size else None
    if net_size and (net_size[0] % 64 or net_size[1] % 64):
        raise InputError(f"--size {size}: height and width must be multiples of 64, e.g. 384x512")
    result = evaluate(method, data, weights=None if weights == "random" else weights, size=net_size,
                      trusted_keys=trust or None)
    if json_out:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"{result['method']} on {data}")
    typer.echo(f"{'set':<20}{'pairs':>6}{'EPE px':>9}{'Fl-all':>9}{'ms/pair':>10}")
    for name, s in result["sets"].items():
        fl = f"{100 * s['fl_all']:8.2f}%" if "fl_all" in s else f"{'-':>9}"
        typer.echo(f"{name:<20}{s['pairs']:>6}{s['epe']:>9.3f}{fl}{s['ms_per_pair']:>10.1f}")
    pairs = sum(s["pairs"] for s in result["sets"].values())
    typer.echo(f"{'all':<20}{pairs:>6}{result['epe']:>9.3f}")
