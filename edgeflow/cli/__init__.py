"""The `edgeflow` command: one module per command, each a thin shell over a public API call.

Errors derived from EdgeflowError print one line `Error: ...` and exit with the error's code.
Heavy imports (torch, TVM, OpenCV) happen inside the commands, so `edgeflow --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

# Each module defines `register(app)`; the order is the order of `edgeflow --help`.
COMMANDS = ["models", "targets", "synth", "train", "import_weights", "prune", "compile", "eval", "run", "inspect", "bench"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Dense optical flow on the edge: FlowNet2 compiled with TVM for Jetson and CPUs.")


def _version(value: bool) -> None:
    if value:
        from edgeflow import __version__

        typer.echo(f"edgeflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Dense optical flow on the edge: FlowNet2 compiled with TVM for Jetson and CPUs."""


for _name in COMMANDS:
    importlib.import_module(f"edgeflow.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning EdgeflowError into `Error: ...` and its exit code."""
    from typer.exceptions import TyperException

    from edgeflow.errors import EdgeflowError

    try:
        app(args=argv, standalone_mode=False)
    except EdgeflowError as e:
        typer.echo(f"Error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("Error: aborted", err=True)
        return 130
    except TyperException as e:  # usage errors: unknown option, missing argument, ...
        typer.echo(f"Error: {e.format_message()}", err=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
