"""`edgeflow targets`: the boards table."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("targets")(targets_cmd)


def targets_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the targets: boards with their aliases, arch, CUDA release and peaks."""
    import dataclasses
    import json

    from edgeflow.targets import BOARDS

    if json_out:
        typer.echo(json.dumps([dataclasses.asdict(b) for b in BOARDS.values()], indent=1))
        return
    typer.echo(f"{'name':<19}{'aliases':<18}{'arch':<7}{'CUDA':<6}{'fp16 TF':>8}{'GB/s':>7}  description")
    for b in BOARDS.values():
        typer.echo(f"{b.name:<19}{','.join(b.aliases):<18}{b.cuda_arch or '-':<7}{b.cuda_version or '-':<6}"
                   f"{b.peak_fp16_tflops or 0:>8.2f}{b.memory_bandwidth_gbs or 0:>7.1f}  {b.description}")
