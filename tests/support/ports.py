"""Free TCP ports on 127.0.0.1, for listeners whose setting has no "pick one" value."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free right now. Another process could take it before it is bound again; the
    listeners that take it fail loudly then, never silently (SO_REUSEPORT is off)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
