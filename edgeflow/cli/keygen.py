"""`edgeflow keygen KEY`: an Ed25519 key pair for signing packages (KEY and KEY.pub)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen_cmd)


def keygen_cmd(
    key: Path = typer.Argument(..., metavar="KEY", help="Private key file to write; the public key goes to KEY.pub."),
    force: bool = typer.Option(False, help="Overwrite KEY and KEY.pub if they exist."),
) -> None:
    """Write an Ed25519 key pair: sign with `edgeflow compile --sign KEY`, trust with `--trust KEY.pub`."""
    from edgeflow.runtime.signing import keygen

    private, public, kid = keygen(key, overwrite=force)
    typer.echo(f"key {kid}: private {private} (keep it secret), public {public} (give it to devices)")
