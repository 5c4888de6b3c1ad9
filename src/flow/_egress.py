"""Fail-closed egress allowlist: ``[egress] allowed_tcp`` and ``allowed_http``.

Every node that opens an outbound connection declares its targets (``Node.egress()``); the
graph is refused at load, at start and at reload unless each target is allowed, and nodes
call :meth:`EgressPolicy.check_tcp` / :meth:`EgressPolicy.check_http` again right before they
connect (defence in depth: a target computed at run time is caught too). An empty or absent
allowlist permits nothing.

Matching is literal: host names are compared case-insensitively but never resolved, ports
must be equal (an http URL without a port means 80, https 443), and an HTTP prefix matches on
a path-segment boundary (``/dicom-web`` allows ``/dicom-web/studies``, not ``/dicom-webx``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from ._errors import ConfigError, EgressDenied

_DEFAULT_PORTS = {"http": 80, "https": 443}


class EgressConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[egress]`` table of a site config."""

    allowed_tcp: list[str] = []
    allowed_http: list[str] = []


@dataclass(frozen=True, slots=True)
class TcpTarget:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HttpTarget:
    url: str

    def __str__(self) -> str:
        return _redact_userinfo(self.url)


Target = TcpTarget | HttpTarget


def _redact_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return parts._replace(netloc=netloc).geturl()
    return url


def parse_tcp(entry: str) -> TcpTarget:
    """``host:port`` or ``[v6]:port`` → :class:`TcpTarget`; ValueError when malformed."""
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r} is not host:port")
    return TcpTarget(host.strip("[]").lower(), int(port))


@dataclass(frozen=True, slots=True)
class _HttpPrefix:
    scheme: str
    host: str
    port: int
    path: str  # no trailing slash; "" means the whole origin

    @classmethod
    def parse(cls, url: str) -> "_HttpPrefix":
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s)://host[:port][/prefix] URL")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{_redact_userinfo(url)!r} must not carry credentials, "
                             "a query or a fragment")
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise ValueError(f"{url!r} has an invalid port") from exc
        return cls(scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))

    def covers(self, other: "_HttpPrefix") -> bool:
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        return other.path == self.path or other.path.startswith(self.path + "/")


class EgressPolicy:
    """The compiled allowlist. Immutable; a reload builds a new one."""

    def __init__(self, config: EgressConfig | None = None, *, source: str = "[egress]") -> None:
        config = config or EgressConfig()
        self.source = source
        self._tcp: set[TcpTarget] = set()
        self._http: list[_HttpPrefix] = []
        for i, entry in enumerate(config.allowed_tcp):
            try:
                self._tcp.add(parse_tcp(entry))
            except ValueError as exc:
                raise ConfigError(f"{source}: key egress.allowed_tcp[{i}]: {exc}") from None
        for i, entry in enumerate(config.allowed_http):
            try:
                self._http.append(_HttpPrefix.parse(entry))
            except ValueError as exc:
                raise ConfigError(f"{source}: key egress.allowed_http[{i}]: {exc}") from None

    @property
    def empty(self) -> bool:
        return not self._tcp and not self._http

    def allows(self, target: Target) -> bool:
        if isinstance(target, TcpTarget):
            return TcpTarget(target.host.lower(), target.port) in self._tcp
        try:
            wanted = _HttpPrefix.parse(target.url.split("?", 1)[0])
        except ValueError:
            return False
        return any(prefix.covers(wanted) for prefix in self._http)

    def check(self, target: Target, *, node: str | None = None) -> None:
        """Raise :class:`EgressDenied` naming the target unless it is allowed."""
        if self.allows(target):
            return
        key = "allowed_tcp" if isinstance(target, TcpTarget) else "allowed_http"
        who = f"node {node!r}: " if node else ""
        why = ("the allowlist is empty, which permits nothing" if self.empty
               else f"it is not in [egress] {key}")
        raise EgressDenied(f"{who}egress to {target} refused: {why} ({self.source})")

    def check_tcp(self, host: str, port: int, *, node: str | None = None) -> None:
        self.check(TcpTarget(host, port), node=node)

    def check_http(self, url: str, *, node: str | None = None) -> None:
        self.check(HttpTarget(url), node=node)
