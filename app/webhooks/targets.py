"""Webhook targets: which addresses a webhook may reach (SSRF guard) and the signature it carries.

The host is resolved when a job is submitted and again when each delivery connects: the delivery connects to
an address it has just checked (GuardedBackend), so a DNS answer that changes in between cannot point it at
an internal service.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

import httpcore

from app.errors import WebhookUrlForbidden, WebhookUrlUnresolvable

SIGNATURE_HEADER = "ModelPress-Signature"
EVENT_HEADER = "ModelPress-Event"
DELIVERY_HEADER = "ModelPress-Delivery"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ModelPress-Signature value: t=<unix ts>,v1=<hex HMAC-SHA256(secret, f"{ts}.{body}")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def forbidden_reason(address: str) -> str | None:
    """Why a webhook may not reach this IP address, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{flag}"):
            return f"{ip} is a {flag.replace('_', '-')} address"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return f"{ip} is not a public address"
    return None


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlUnresolvable(f"webhook host {host!r} does not resolve: {exc}", field="webhook_url") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def check_host(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The host's addresses, every one of them allowed; WebhookUrlForbidden when one is not."""
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason:
                raise WebhookUrlForbidden(
                    f"webhook_url host {host!r} resolves to {reason}; webhooks may only reach public addresses "
                    "(an administrator can allow private ones with MODELPRESS_WEBHOOK_ALLOW_PRIVATE=true)",
                    field="webhook_url")
    return addresses


def check_url(url: str, *, allow_private: bool) -> None:
    host, port = host_port(url)
    check_host(host, port, allow_private=allow_private)


class GuardedBackend(httpcore.SyncBackend):
    """Resolves and checks the host when it connects, then connects to the checked address itself.

    TLS still verifies the certificate against the URL's host name (httpcore passes it as server_hostname).
    """

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = check_host(host, port, allow_private=self.allow_private)
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"no address for {host}")
