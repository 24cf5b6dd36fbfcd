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
from dataclasses import dataclass
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


# Prefixes that carry an IPv4 address inside an IPv6 one (besides ::ffff:0:0/96, 6to4 and Teredo, which Python
# unwraps itself): a relay or translator would deliver to the IPv4 address, so that address is what is checked.
NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
ISATAP_MARKERS = (0x00005EFE, 0x02005EFE)  # interface id ::0:5efe:a.b.c.d / ::200:5efe:a.b.c.d


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address wraps, with the name of the wrapping."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo (server)", server), ("Teredo (client)", client)]
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in prefix for prefix in NAT64_PREFIXES):
        found.append(("NAT64", low32))
    if ip in IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are checked as themselves
        found.append(("IPv4-compatible", low32))
    if (int(ip) >> 32) & 0xFFFFFFFF in ISATAP_MARKERS:
        found.append(("ISATAP", low32))
    return found


def forbidden_reason(address: str) -> str | None:
    """Why a webhook may not reach this IP address, or None when it may. An IPv6 address that wraps an IPv4 one
    (IPv4-mapped, 6to4, Teredo, NAT64, IPv4-compatible, ISATAP) is judged by the address it wraps as well."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        for wrapping, inner in _embedded_ipv4(ip):
            reason = _special(inner)
            if reason:
                return f"{ip} wraps {inner} ({wrapping}), which {reason}"
        if ip.ipv4_mapped is not None:
            return None  # ::ffff:a.b.c.d of a public a.b.c.d
    reason = _special(ip)
    return f"{ip} {reason}" if reason else None


def _special(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{flag}"):
            return f"is a {flag.replace('_', '-')} address"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "is not a public address"
    return None


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlUnresolvable(f"webhook host {host!r} does not resolve: {exc}", field="webhook_url") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # an address string for INET and INET6


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class EgressPolicy:
    """Where webhooks may go: public addresses (private ones too when `allow_private`), never a denied host, and
    only an allowed one when an allowlist is set. Entries are host names (`hooks.example.com`, `*.example.com`)
    or networks (`203.0.113.0/24`, `2001:db8::/32`, a single address)."""

    allow_private: bool = False
    allowed: tuple[str, ...] = ()
    denied: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings) -> EgressPolicy:
        return cls(allow_private=settings.webhook_allow_private, allowed=_entries(settings.webhook_allowed_hosts),
                   denied=_entries(settings.webhook_denied_hosts))

    def refusal(self, host: str, address: str) -> str | None:
        """Why this host at this address may not be reached, or None."""
        if any(_matches(entry, host, address) for entry in self.denied):
            return f"{host!r} ({address}) is on the operator's denylist (MODELPRESS_WEBHOOK_DENIED_HOSTS)"
        if self.allowed and not any(_matches(entry, host, address) for entry in self.allowed):
            return (f"{host!r} ({address}) is not on the operator's allowlist (MODELPRESS_WEBHOOK_ALLOWED_HOSTS: "
                    f"{', '.join(self.allowed)})")
        if not self.allow_private:
            reason = forbidden_reason(address)
            if reason:
                return (f"{host!r} resolves to {reason}; webhooks may only reach public addresses (an administrator "
                        "can allow private ones with MODELPRESS_WEBHOOK_ALLOW_PRIVATE=true)")
        return None


def _entries(text: str) -> tuple[str, ...]:
    return tuple(entry.strip().lower() for entry in text.split(",") if entry.strip())


def _matches(entry: str, host: str, address: str) -> bool:
    host = host.lower().rstrip(".")
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        if entry.startswith("*."):
            return host.endswith(entry[1:])
        return host == entry.rstrip(".")
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version == network.version and ip in network


def check_host(host: str, port: int, *, policy: EgressPolicy) -> list[str]:
    """The host's addresses, every one of them allowed; WebhookUrlForbidden when one is not."""
    addresses = resolve(host, port)
    for address in addresses:
        reason = policy.refusal(host, address)
        if reason:
            raise WebhookUrlForbidden(f"webhook_url host {reason}", field="webhook_url")
    return addresses


def check_url(url: str, *, policy: EgressPolicy) -> None:
    host, port = host_port(url)
    check_host(host, port, policy=policy)


class GuardedBackend(httpcore.SyncBackend):
    """Resolves and checks the host when it connects, then connects to the checked address itself.

    TLS still verifies the certificate against the URL's host name (httpcore passes it as server_hostname).
    """

    def __init__(self, *, policy: EgressPolicy) -> None:
        self.policy = policy

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = check_host(host, port, policy=self.policy)
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"no address for {host}")
