"""Shared HTTP plumbing for senders that talk to one HTTP destination (STOW-RS, FHIR).

Everything here is either a pure function (outcome classification, Retry-After parsing) or
builds an :class:`httpx.AsyncClient` with the project's hardening:

- one connection pool per destination, HTTP/1.1 keep-alive, at most ``max_connections``;
- timeouts (connect, read, write, pool) from one ``timeout_ms``;
- TLS verification always on; ``tls_ca`` only *adds* a CA file to trust instead of the
  system store (there is no switch to turn verification off);
- redirects are never followed (a 3xx is a permanent outcome: the configured URL is wrong,
  and following it could leave the egress allowlist);
- ``trust_env=False``: proxy variables and ``.netrc`` in the environment are ignored, so the
  egress allowlist is about the host actually connected to;
- an optional auth header whose value comes from a file or an environment variable named in
  the config, never from the TOML itself; the value is never logged or put in an error.

httpx's AsyncClient runs on Trio (httpcore picks its Trio backend via sniffio).

Outcome reasons are routing-safe: status codes and exception *class* names only (exception
messages can quote URLs with credentials or, from some servers, request content).
"""

from __future__ import annotations

import email.utils
import os
import re
import ssl
import time
from datetime import timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flow import Config, ConfigError

from .outcome import Delivered, Outcome, Permanent, Transient

if TYPE_CHECKING:  # imported where used: only a process that sends over HTTP needs httpx
    import httpx

__all__ = [
    "HttpClientConfig", "build_client", "load_secret", "make_client", "parse_retry_after",
    "classify_http", "classify_transport_error",
]


class HttpClientConfig(Config):
    """Config keys every HTTP destination shares; sender configs subclass it.

    Attributes:
        url: base URL, ``http(s)://host[:port]/prefix`` (no credentials, query or fragment).
        timeout_ms: connect/read/write/pool timeout for each request, in milliseconds.
        max_connections: size of the destination's connection pool (= concurrent requests).
        tls_ca: PEM CA bundle to verify the server with instead of the system store.
        auth_header_file: file whose content (stripped) is the auth header's value.
        auth_header_env: name of an environment variable holding the auth header's value.
        auth_header_name: the header to send it in.
    """

    url: str
    timeout_ms: int = 30_000
    max_connections: int = 4
    tls_ca: str | None = None
    auth_header_file: str | None = None
    auth_header_env: str | None = None
    auth_header_name: str = "Authorization"

    def __post_init__(self) -> None:
        # msgspec turns ValueError raised here into a ValidationError; flow's config loader
        # turns that into a ConfigError naming the section.
        check_url(self.url)
        if self.timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.auth_header_file and self.auth_header_env:
            raise ValueError("set auth_header_file or auth_header_env, not both")


def check_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a plain ``http(s)://host[:port][/path]`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("url must not carry credentials, a query or a fragment "
                         "(use auth_header_file or auth_header_env for credentials)")


def load_secret(file: str | None, env: str | None, *, key: str = "auth_header") -> str | None:
    """The auth header value from ``file`` or the environment variable named ``env``.

    Returns None when neither is configured. Raises :class:`flow.ConfigError` naming the
    config key (``{key}_file`` / ``{key}_env``) when the file cannot be read, the variable is
    unset, the value is empty or contains a line break (header injection). The message never
    contains the secret. Surrounding whitespace (a trailing newline in the file) is stripped.
    """
    if file and env:
        raise ConfigError(f"{key}_file and {key}_env are both set; choose one")
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"key {key}_file: cannot read secret file {file!r} "
                              f"({exc.strerror or type(exc).__name__})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"key {key}_file: secret file {file!r} is not UTF-8 text") from None
        where = f"key {key}_file: secret file {file!r}"
    elif env:
        raw = os.environ.get(env)
        if raw is None:
            raise ConfigError(f"key {key}_env: environment variable {env!r} is not set")
        value = raw.strip()
        where = f"key {key}_env: environment variable {env!r}"
    else:
        return None
    if not value:
        raise ConfigError(f"{where} is empty")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(f"{where} contains a line break or NUL; it must be one header value")
    return value


def make_client(*, timeout_ms: int, max_connections: int, tls_ca: str | None = None,
                headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """An AsyncClient for one destination, hardened as described in the module docstring.

    Raises :class:`flow.ConfigError` when ``tls_ca`` cannot be loaded. The caller owns the
    client and must ``await client.aclose()`` (or use it as an async context manager).
    """
    try:
        context = ssl.create_default_context(cafile=tls_ca) if tls_ca else \
            ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"key tls_ca: cannot load CA file {tls_ca!r} "
                          f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    import httpx

    seconds = timeout_ms / 1000
    return httpx.AsyncClient(
        verify=context,
        http1=True,
        http2=False,
        timeout=httpx.Timeout(seconds),
        limits=httpx.Limits(max_connections=max_connections,
                            max_keepalive_connections=max_connections,
                            keepalive_expiry=30.0),
        follow_redirects=False,
        trust_env=False,
        headers=headers or {},
    )


def build_client(config: HttpClientConfig) -> httpx.AsyncClient:
    """:func:`make_client` from a config, with its auth header loaded by :func:`load_secret`."""
    secret = load_secret(config.auth_header_file, config.auth_header_env)
    headers = {config.auth_header_name: secret} if secret is not None else {}
    return make_client(timeout_ms=config.timeout_ms, max_connections=config.max_connections,
                       tls_ca=config.tls_ca, headers=headers)


_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), or None.

    Accepts delta-seconds (``"120"``) and an HTTP-date (``"Wed, 21 Oct 2026 07:28:00 GMT"``,
    measured from ``now``, a Unix time defaulting to the clock; a date in the past gives 0).
    Anything else, including negative or absurd values, gives None.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110: HTTP-dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    reference = time.time() if now is None else now
    return max(0.0, when.timestamp() - reference)


def classify_http(status: int, retry_after: float | str | None = None) -> Outcome | None:
    """The outcome class of a final HTTP status, for the classes every sender shares.

    - 2xx → :class:`Delivered` (senders with per-item bodies, e.g. STOW 202, look first);
    - 3xx → :class:`Permanent` "redirect not followed" (the configured URL is wrong);
    - 408, 429 → :class:`Transient` with ``retry_after`` (seconds or a raw header value);
    - other 4xx → :class:`Permanent`;
    - 5xx → :class:`Transient` (with ``retry_after`` when the server sent one, e.g. 503);
    - anything outside 200..599 → None: not a final status we know; the caller decides.
    """
    if isinstance(retry_after, str):
        retry_after = parse_retry_after(retry_after)
    if 200 <= status < 300:
        return Delivered()
    if 300 <= status < 400:
        return Permanent(f"HTTP {status}: redirect not followed")
    if status in (408, 429):
        return Transient(f"HTTP {status}", retry_after)
    if 400 <= status < 500:
        return Permanent(f"HTTP {status}")
    if 500 <= status < 600:
        return Transient(f"HTTP {status}", retry_after)
    return None


def classify_transport_error(exc: BaseException) -> Transient:
    """A request that got no HTTP answer (refused, reset, timeout, TLS failure) → Transient.

    The reason names the exception class only: messages can contain URLs or peer text.
    """
    import httpx

    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "transport error"
    return Transient(f"{kind}: {type(exc).__name__}")
