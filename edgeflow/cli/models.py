"""`edgeflow models`: the registry, with parameter counts and shipped weights."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(models)


def models(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the FlowNet2 models: name, width, parameters, shipped weights."""
    import json

    from edgeflow.models import SPECS
    from edgeflow.models.stack import FlowNet2
    from edgeflow.models.weights import shipped

    have = shipped()
    rows = []
    for s in SPECS.values():
        params = sum(p.numel() for p in FlowNet2(s.stages, s.width).parameters())
        rows.append({"name": s.name, "width": s.width, "params": params,
                     "weights": "edgeflow" if s.name in have else "none",
                     "checkpoints": sorted(have.get(s.name, {}).get("checkpoints", {})), "description": s.description})
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'name':<14}{'width':>7}{'params':>10}  {'weights':<9}description")
    for r in rows:
        also = f" (weights also: {', '.join(r['checkpoints'])})" if r["checkpoints"] else ""
        typer.echo(f"{r['name']:<14}{r['width']:>7.3f}{r['params'] / 1e6:>9.2f}M  {r['weights']:<9}{r['description']}{also}")
