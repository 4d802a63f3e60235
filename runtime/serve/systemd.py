"""systemd's notify protocol without a dependency: datagrams to $NOTIFY_SOCKET.

`Type=notify` units wait for "READY=1"; with `WatchdogSec=` systemd sets $WATCHDOG_USEC and
restarts the service when "WATCHDOG=1" does not come at least that often. Outside systemd
(no $NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send `message` ("READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=...") to systemd; whether
    there was a socket to send it to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of $WATCHDOG_USEC), or None when systemd set no
    watchdog for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
