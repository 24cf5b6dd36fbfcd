"""Where ModelPress may connect to reach a tenant's MLflow server (SSRF guard).

The tracking URI is the tenant's to give, and the API and the workers connect to it: like a webhook target
(app.webhooks.targets), it must resolve to public addresses only, unless an administrator allows private ones
(MODELPRESS_MLFLOW_ALLOW_PRIVATE=true: an MLflow server inside the company network, or loopback in the tests).
The addresses are checked when the URI is saved and again on every connection, which then goes to the address
just checked, so a DNS answer that changes in between cannot point ModelPress at an internal service.
"""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpcore

from app.errors import MlflowUnreachable, MlflowUriForbidden, MlflowUriUnresolvable, ModelPressError
from app.webhooks.targets import forbidden_reason


def split_uri(uri: str) -> tuple[str, int]:
    """(host, port) of an http(s) tracking URI; MlflowUriForbidden for any other scheme."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MlflowUriForbidden("the MLflow tracking URI must be an absolute http:// or https:// URL (a file: or "
                                 "database URI would make ModelPress read its own disk)", field="tracking_uri")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def allowed_addresses(host: str, port: int, *, allow_private: bool,
                      unresolvable: type[ModelPressError] = MlflowUnreachable) -> list[str]:
    """The host's addresses, every one of them allowed; MlflowUriForbidden when one is not, `unresolvable`
    (mlflow_unreachable on a connection, mlflow_uri_unresolvable when settings are saved) when the host does not
    resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise unresolvable(f"the MLflow host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason:
                raise MlflowUriForbidden(
                    f"the MLflow host {host!r} resolves to {reason}; ModelPress reaches MLflow servers on public "
                    "addresses only (an administrator can allow private ones with "
                    "MODELPRESS_MLFLOW_ALLOW_PRIVATE=true)", field="tracking_uri")
    return addresses


def check_uri(uri: str, *, allow_private: bool, saving: bool = False) -> None:
    """The tracking URI passes the egress rules now; `saving`: an unresolvable host is the request's fault (422)."""
    host, port = split_uri(uri)
    allowed_addresses(host, port, allow_private=allow_private,
                      unresolvable=MlflowUriUnresolvable if saving else MlflowUnreachable)


class GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses it has just checked (TLS still verifies the URL's host name)."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        error: Exception | None = None
        for address in allowed_addresses(host, port, allow_private=self.allow_private):
            try:
                return super().connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"no address for {host}")
