"""Typed errors. The CLI prints each as one line `Error: ...` and exits with its code."""


class EdgeflowError(Exception):
    """Base of every error edgeflow reports to a user; the message is one line."""

    exit_code = 1


class InputError(EdgeflowError):
    """A file, flag or value given by the user is not what was expected."""

    exit_code = 2


class PackageError(EdgeflowError):
    """A compiled package is damaged, of an unknown format, or for another target."""

    exit_code = 3


class MissingDependency(EdgeflowError):
    """An optional extra is not installed; the message says which and how to install it."""

    exit_code = 4


def choices_error(what: str, value, choices) -> InputError:
    """`unknown model 'x'; choices: a, b, c` as an InputError."""
    return InputError(f"unknown {what} {value!r}; choices: {', '.join(sorted(choices))}")
