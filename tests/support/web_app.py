"""An ASGI app (the chat example) served by uvicorn on 127.0.0.1 in a thread of the test."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

_STOP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Yields the app's base URL. The socket listens before uvicorn starts, so a request made
    right away waits in the backlog instead of failing: no readiness polling needed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(_STOP_TIMEOUT_S)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("the app did not stop")
