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


def server_context(*, cert: str, key: str, ca: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A listener's context: our certificate and key; with ``ca``, client certificates are
    verified against it (optional unless ``require_client_cert``, which is mTLS)."""
    if require_client_cert and not ca:
        raise ConfigError("key tls_ca: require_client_cert needs a CA to verify clients with")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
