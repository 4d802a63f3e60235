"""Typed errors and the exit codes the CLI maps them to.

Library code raises these with one-line messages worded for API users (parameter names such as
`precision=`, not CLI flags); the CLI prints each as `Error: ...` and exits with its code:

    1  internal   anything unexpected (a bug in edgeflow or a dependency); `--debug` shows the traceback
    2  usage      the command line itself: unknown option, missing argument (typer)
    3  input      a file, flag or value is not what was expected
    4  package    a compiled package is damaged, forged, unsigned where trust is required, of an
                  unknown format, or for another target
    5  accuracy   the compiled model differs from the torch model by more than the tolerance
    6  missing dependency   an optional extra or toolchain is not installed
    130 interrupted (Ctrl-C)
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class EdgeflowError(Exception):
    """Base of every error edgeflow reports to a user; the message is one line."""

    exit_code = EXIT_INTERNAL


class InternalError(EdgeflowError):
    """A step that should not fail did (a toolchain, a schedule): a bug to report, not a user error."""

    exit_code = EXIT_INTERNAL


class InputError(EdgeflowError):
    """A file, flag or value given by the user is not what was expected."""

    exit_code = 3


class PackageError(EdgeflowError):
    """A compiled package is damaged, forged, untrusted, of an unknown format, or for another target."""

    exit_code = 4


class AccuracyError(EdgeflowError):
    """The compiled model's flow differs from the torch model's by more than the tolerance."""

    exit_code = 5


class MissingDependency(EdgeflowError):
    """An optional extra is not installed; the message says which and how to install it."""

    exit_code = 6


def choices_error(what: str, value, choices) -> InputError:
    """`unknown model 'x'; choices: a, b, c` as an InputError."""
    return InputError(f"unknown {what} {value!r}; choices: {', '.join(sorted(choices))}")


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (whitespace folded), or its type name when it has none."""
    return " ".join(str(e).split()) or type(e).__name__
