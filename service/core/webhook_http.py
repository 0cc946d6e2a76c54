"""One webhook POST, bounded: to the address that was checked, within one deadline, reading a few KiB at most.

No HTTP framework: `http.client` on a socket connected here, so that

- the connection goes to the address the callback URL's host resolved to when it was checked
  (service/core/labels.py `resolve_callback`), never to a second resolution (a host that answers a public address
  to the check and a private one to the connect, DNS rebinding, reaches nothing it should not); for https the TLS
  handshake still names the host (SNI) and its certificate is verified against it, and the Host header is the URL's;
- the whole delivery (connect, TLS, request, status line, headers, the bit of body read) ends by one deadline: a
  watchdog shuts the socket down when it passes, so a receiver that trickles a byte every few seconds (each read
  within any per-read timeout) cannot hold the process for longer;
- at most MAX_RESPONSE_BYTES of the answer's body are read (its status code is what counts), so a receiver
  answering with gigabytes costs nothing.
No redirects are followed (a public URL must not bounce the POST into a private network).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

MAX_RESPONSE_BYTES = 4096


class DeliveryTimeout(Exception):
    """The receiver did not answer within the whole delivery's time bound."""


@dataclass(frozen=True)
class WebhookTarget:
    """A checked callback URL: where to connect (`address`) and what to name (`host`, for Host and TLS)."""

    scheme: str
    host: str  # as in the URL (no brackets for IPv6)
    port: int
    path: str  # path and query
    address: str  # the checked IP address to connect to

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to `target.address`; the socket is kept so that the watchdog can shut it down."""

    def __init__(self, target: WebhookTarget, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.target = target
        self.tls: ssl.SSLContext | None = ssl.create_default_context() if target.scheme == "https" else None
        self.raw: socket.socket | None = None

    def connect(self) -> None:
        self.raw = socket.create_connection((self.target.address, self.target.port), timeout=self.timeout)
        self.sock = self.raw
        if self.tls is not None:
            self.sock = self.tls.wrap_socket(self.raw, server_hostname=self.target.host)

    def cut(self) -> None:
        """Called by the watchdog: make every blocked read or write of this connection return at once."""
        if self.raw is not None:
            try:
                self.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def post(target: WebhookTarget, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `body`; the receiver's status code. DeliveryTimeout past `timeout_s` in all; OSError, ssl.SSLError or
    http.client.HTTPException when the receiver cannot be reached or answers something that is not HTTP."""
    connection = _PinnedConnection(target, timeout_s)
    deadline = time.monotonic() + timeout_s
    watchdog = threading.Timer(timeout_s, connection.cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.putrequest("POST", target.path or "/", skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": target.host_header, "Content-Length": str(len(body)), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        try:
            response.read(MAX_RESPONSE_BYTES)  # a bit of the body, so a well-behaved receiver sees its answer read
        except (OSError, http.client.HTTPException):
            pass  # the status line and headers arrived: that is the answer
        return response.status
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline:
            raise DeliveryTimeout(f"the receiver did not answer within {timeout_s:g} s") from error
        raise
    finally:
        watchdog.cancel()
        connection.close()
