"""A submit's labels (name, tags, metadata) and callback URL, checked beyond what the schema can say. No HTTP.

The schema bounds each field; here: the metadata's total size, and the callback URL's host, which must not be a
private, loopback, link-local or otherwise non-public address (the service would otherwise POST into its own
network on a caller's behalf) unless the operator allows it with HYDRA_CALLBACK_ALLOW.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import msgspec
from msgspec import UNSET

from hydra_ablate_client.wire import MAX_METADATA_BYTES, JobRequest
from service.core.errors import ValidationProblem
from service.core.store import JobLabels
from service.core.webhook_http import WebhookTarget

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow_list(raw: str) -> tuple[IpNetwork, ...]:
    """HYDRA_CALLBACK_ALLOW: comma-separated networks (CIDR or single addresses) callbacks may reach anyway."""
    networks: list[IpNetwork] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"HYDRA_CALLBACK_ALLOW: {item!r} is not an IP network (e.g. 127.0.0.0/8)") from None
    return tuple(networks)


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError) as exc:  # IDNA refuses over-long labels with a UnicodeError
        raise CallbackRefused(f"its host {host!r} does not resolve ({exc})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class CallbackRefused(Exception):
    """A callback URL the service will not call; the message says why."""


def check_callback_url(url: str, allowed: Iterable[IpNetwork]) -> None:
    """Raise CallbackRefused unless every address the URL's host resolves to is public or allowed."""
    resolve_callback(url, allowed)


def resolve_callback(url: str, allowed: Iterable[IpNetwork]) -> WebhookTarget:
    """The URL's host resolved once and every address checked; the delivery connects to the first of them (not to a
    second resolution, which could answer otherwise). CallbackRefused says what is wrong."""
    try:
        parts = urlsplit(url)
        hostname, _ = parts.hostname, parts.port  # both raise ValueError on a malformed authority
    except ValueError as exc:
        raise CallbackRefused(f"it is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise CallbackRefused("it must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise CallbackRefused("it must not carry credentials; the delivery is signed instead")
    allowed = tuple(allowed)
    addresses = _addresses(hostname)
    for address in addresses:
        if any(address in network for network in allowed):
            continue
        if not address.is_global or address.is_multicast:
            raise CallbackRefused(
                f"its host resolves to {address}, a private, loopback or reserved address; an operator can allow "
                "such networks with HYDRA_CALLBACK_ALLOW"
            )
    if not addresses:
        raise CallbackRefused(f"its host {hostname!r} resolves to no address")
    path = parts.path or "/"
    return WebhookTarget(
        scheme=parts.scheme,
        host=hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        path=f"{path}?{parts.query}" if parts.query else path,
        address=str(addresses[0]),
    )


def labels_of(request: JobRequest, allowed: Iterable[IpNetwork]) -> JobLabels:
    """The request's labels, checked (ValidationProblem, 422, naming the field)."""
    metadata = {} if request.metadata is UNSET else dict(request.metadata)
    if len(msgspec.json.encode(metadata)) > MAX_METADATA_BYTES:
        raise ValidationProblem(
            f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON; keep it small", "metadata"
        )
    callback_url = None if request.callback_url is UNSET else request.callback_url
    if callback_url is not None:
        try:
            check_callback_url(callback_url, allowed)
        except CallbackRefused as exc:
            raise ValidationProblem(f"callback_url {callback_url!r} is refused: {exc}", "callback_url") from None
    return JobLabels(
        name=None if request.name is UNSET else request.name,
        tags=[] if request.tags is UNSET else list(dict.fromkeys(request.tags)),
        metadata=metadata,
        callback_url=callback_url,
    )
