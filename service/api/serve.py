"""One API process on a port that several share: `python -m service.api.serve HOST PORT [LOG_LEVEL]`.

The local stack (cli/stack.py) runs `HYDRA_API_PROCESSES` of these on one port. Each binds a socket of its own
with SO_REUSEPORT, and the kernel spreads new connections evenly among them. uvicorn's `--workers` shares one
listening socket instead, and the process that wakes first accepts every connection waiting (the whole opening
burst of fifty clients, on connections kept alive for the rest of the run), so a second process barely helped.
SO_REUSEPORT is Linux's (elsewhere the stack runs one process).
"""

from __future__ import annotations

import socket
import sys

import uvicorn

REUSE_PORT = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound TCP socket for (host, port); with `reuse_port`, one that other processes may bind as well."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on (host, port): a socket without SO_REUSEPORT cannot bind beside any listener,
    not even one that set it (a stack already serving there would otherwise be joined silently)."""
    try:
        listening_socket(host, port, reuse_port=False).close()
    except OSError:
        return False
    return True


def main(argv: list[str]) -> None:
    host, port = argv[0], int(argv[1])
    log_level = argv[2] if len(argv) > 2 else "warning"
    sock = listening_socket(host, port, reuse_port=REUSE_PORT)
    # No uvicorn access log: the app logs requests itself (HYDRA_ACCESS_LOG, service/api/observability.py), and uvicorn
    # formats its line's arguments (client address, quoted path) for every request even when the level hides it.
    config = uvicorn.Config("service.api.app:create_app", factory=True, log_level=log_level, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
