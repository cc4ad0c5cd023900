"""Telling a service manager how the service is doing: systemd's readiness protocol.

With ``Type=notify`` systemd counts the service started only once it says ``READY=1`` on the
datagram socket that ``$NOTIFY_SOCKET`` names, so units ordered after imaptap (and scripts
waiting on ``systemctl start``) start once capture has begun, not when the process was forked.
Outside such a service the variable is unset and nothing is sent.
"""

from __future__ import annotations

import os
import socket

#: The environment variable systemd sets to the socket's path (``@`` for the abstract namespace).
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send ``state`` (lines such as ``READY=1``) to the service manager; False where there is none."""
    path = os.environ.get(NOTIFY_SOCKET, "")
    if path.startswith("@"):
        address = "\0" + path[1:]
    elif path.startswith("/"):
        address = path
    else:  # unset, or a transport other than a unix socket: nothing to tell
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
