"""``ssl.SSLContext`` builders for DIMSE over TLS (PS3.15 Annex B; BCP 195: TLS 1.2 or later).

Both raise :class:`flow.ConfigError` naming the config key when a file cannot be loaded;
the message never includes key material.
"""

from __future__ import annotations

import ssl

from flow import ConfigError


def _fail(key: str, path: str | None, exc: BaseException) -> ConfigError:
    why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
    return ConfigError(f"key {key}: cannot load {path!r} ({why})")


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose handshake happens in the association's thread, bounded.

    pynetdicom wraps each accepted socket in its single accept thread, and by default the
    TLS handshake runs right there, blocking: one client that connects and sends nothing
    stalls every later association (and the listener's shutdown) forever. Here the wrap
    returns at once; OpenSSL performs the handshake on the first read, in the association's
    own thread, and ``handshake_timeout`` bounds every blocking read of that socket.
    """

    handshake_timeout: float = 30.0

    def wrap_socket(self, sock, *args, **kwargs):  # type: ignore[override]
        sock.settimeout(self.handshake_timeout)
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(*, cert: str, key: str, ca: str | None = None,
                   require_client_cert: bool = False,
                   handshake_timeout: float = 30.0) -> ssl.SSLContext:
    """A listener's context: our certificate and key; with ``ca``, client certificates are
    verified against it (optional unless ``require_client_cert``, which is mTLS). The
    handshake never blocks the accept loop (see :class:`_DeferredHandshakeContext`)."""
    if require_client_cert and not ca:
        raise ConfigError("key tls_ca: require_client_cert needs a CA to verify clients with")
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = handshake_timeout
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise _fail("tls_cert/tls_key", cert, exc) from None
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise _fail("tls_ca", ca, exc) from None
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(*, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A sender's context: the peer is always verified (against ``ca``, or the system store);
    ``cert``/``key`` present our client certificate for mTLS."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise _fail("tls_ca", ca, exc) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if cert or key:
        if not (cert and key):
            raise ConfigError("keys tls_cert and tls_key: set both for a client certificate")
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise _fail("tls_cert/tls_key", cert, exc) from None
    return context
