"""The `edgeflow` command: one module per command, each a thin shell over a public API call.

Every error prints one line `Error: ...` and exits with a code from `edgeflow.errors`: the
error's own for EdgeflowError, 2 for usage errors, 1 (internal) for anything else. The traceback
is printed only under `edgeflow --debug ...` or EDGEFLOW_DEBUG=1. Heavy imports (torch, TVM,
OpenCV) happen inside the commands, so `edgeflow --help` is fast.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer

# Each module defines `register(app)`; the order is the order of `edgeflow --help`.
COMMANDS = ["models", "targets", "synth", "train", "import_weights", "prune", "adapt", "keygen", "compile", "tune",
            "eval", "run", "serve", "check", "inspect", "bench"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Dense optical flow on the edge: FlowNet2 compiled with TVM for Jetson and CPUs.")


def _version(value: bool) -> None:
    if value:
        from edgeflow import __version__

        typer.echo(f"edgeflow {__version__}")
        raise typer.Exit()


_debug = {"on": False}  # set by --debug for this invocation of main()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error (or EDGEFLOW_DEBUG=1).")
          ) -> None:
    """Dense optical flow on the edge: FlowNet2 compiled with TVM for Jetson and CPUs."""
    _debug["on"] = debug


for _name in COMMANDS:
    importlib.import_module(f"edgeflow.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; every error becomes one line `Error: ...` and its exit code."""
    from typer.exceptions import TyperException

    from edgeflow.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EdgeflowError, one_line

    _debug["on"] = False
    try:
        app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except TyperException as e:  # usage errors: unknown option, missing argument, ...
        return _fail(e.format_message(), e.exit_code)
    except EdgeflowError as e:
        return _fail(one_line(e), e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the contract: one line, the internal-error code
        return _fail(f"internal error ({type(e).__name__}: {one_line(e)[:300]}); run with --debug for the "
                     f"traceback and report it", EXIT_INTERNAL)
    return 0


def _fail(message: str, code: int) -> int:
    if _debug["on"] or os.environ.get("EDGEFLOW_DEBUG", "") not in ("", "0"):
        traceback.print_exc()
    typer.echo(f"Error: {message}", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
