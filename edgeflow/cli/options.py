"""Option parsing shared by several commands."""

from __future__ import annotations

from edgeflow.errors import InputError

TRUST_HELP = ("Refuse the package unless signed by this Ed25519 public key (repeatable; "
              "default: the files in $EDGEFLOW_TRUSTED_KEYS).")


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'384x512' -> (384, 512); InputError naming `flag` otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected HxW, e.g. 384x512") from None
    if h <= 0 or w <= 0:
        raise InputError(f"{flag} {text!r}: expected positive HxW, e.g. 384x512")
    return h, w
