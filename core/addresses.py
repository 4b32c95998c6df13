"""Which network addresses a URI or a webhook may reach: public ones only, unless configured otherwise."""

from __future__ import annotations

import ipaddress
import socket

from core.errors import AccessDenied, FetchFailed


def check_public_host(host: str, uri: str, field: str | None = None) -> None:
    """Refuse hosts that resolve to loopback, private, link-local or otherwise non-public addresses."""
    if not host:
        raise AccessDenied(f"{uri}: no host", param=field)
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise FetchFailed(f"{uri}: cannot resolve {host}: {exc}", param=field) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise AccessDenied(f"{uri}: {host} resolves to a non-public address ({address})", param=field)
