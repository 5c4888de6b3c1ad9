"""Site-config tables of the DIMSE nodes: ``[listen]`` and one table per PACS (``[pacs]``).

Checked when the site file is decoded (a bad value is a ConfigError naming the key, so
``flow check`` catches it too); TLS files are loaded when the node opens.
"""

from __future__ import annotations

import msgspec

from flow import Config, is_loopback

from .contexts import (ACCEPTED_TRANSFER_SYNTAXES, COMMON_SOP_CLASSES, COMMON_TRANSFER_SYNTAXES,
                       PREFERENCE_PRESETS)

DEFAULT_PDU = 131_072  # bytes; fewer PDVs per object than pynetdicom's 16 KiB default


def _check_ae(key: str, value: str) -> None:
    # PS3.5 6.2: AE titles are up to 16 characters of the default character repertoire,
    # no backslash or control characters, not all spaces.
    if not value.strip() or len(value) > 16 or "\\" in value or \
            any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError(f"{key} must be 1 to 16 printable ASCII characters without '\\'")


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError("port must be 1..65535")


def _positive(**values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"{key} must be positive")


def _check_uids(key: str, values: list[str]) -> None:
    for value in values:
        if not value or len(value) > 64 or not all(c.isdigit() or c == "." for c in value):
            raise ValueError(f"{key}: {value!r} is not a UID")


class ListenConfig(Config, kw_only=True):
    """The ``[listen]`` table: the C-STORE/C-ECHO SCP modalities send to.

    Attributes:
        host, port: where to listen. A non-loopback host needs TLS (``tls_cert``/``tls_key``)
            unless ``allow_cleartext = true``.
        ae_title: our AE title; a request calling another AE title is rejected unless
            ``strict_called_ae = false``.
        calling_ae_titles: allowlist of calling AE titles; empty accepts any (and the start-up
            log says so).
        max_pdu_length: largest PDU we accept, bytes (0 = unlimited).
        max_associations: concurrent associations; more are rejected transiently.
        network_timeout_ms / acse_timeout_ms / dimse_timeout_ms: idle connection, association
            negotiation and DIMSE message timeouts.
        commit_timeout_ms: how long one C-STORE waits for the Store's commit before it is
            answered 0xA702 (the sender retries; it is never answered Success uncommitted).
        drain_ms: on graceful stop, how long open associations may finish before an abort.
        tls_cert, tls_key, tls_ca, require_client_cert: TLS (1.2+); ``tls_ca`` verifies client
            certificates, required ones with ``require_client_cert`` (mTLS).
        extra_sop_classes: private or unknown storage SOP Class UIDs to accept besides every
            storage class pynetdicom knows.
        spool_dir: where objects over 2 MiB are received before the commit (default: the
            system temporary directory). They are streamed there, never held whole in
            memory; smaller ones are received in memory.
        tcp_nodelay: disable Nagle's algorithm on accepted sockets (keep it on: true).
        transfer_syntax_preference: which syntax to accept when a presentation context
            proposes several. ``"as-proposed"`` (default): the requestor's first that we
            accept, so objects are stored and forwarded as the modality prefers them
            (compressed stays compressed). ``"explicit-little-endian-first"``: Explicit,
            then Implicit VR Little Endian when proposed (the modality decompresses), else
            as proposed. Or a list of transfer syntax UIDs, preferred in that order; a
            context proposing none of them gets its own first choice.

        negotiation_timeout_ms: how long a new connection has, from the accept, to deliver
            its A-ASSOCIATE-RQ (TLS handshake included); then it is closed.
        max_pending_connections, max_pending_per_peer: connections that have not delivered
            their A-ASSOCIATE-RQ yet, overall and from one IP address; one more is closed as
            soon as it is accepted. They never count against ``max_associations``.
        workers: how many ingest processes listen on ``port`` side by side when the graph
            runs in several processes (``[runtime] processes``): each binds the port with
            SO_REUSEPORT and the kernel spreads new connections among them. Needs a fixed
            port. ``max_associations`` and the pending-connection bounds apply per process.
            Ignored in one-process mode.
    """

    host: str = "127.0.0.1"
    port: int
    ae_title: str
    calling_ae_titles: list[str] = []
    strict_called_ae: bool = True
    max_pdu_length: int = DEFAULT_PDU
    max_associations: int = 16
    network_timeout_ms: int = 60_000
    acse_timeout_ms: int = 30_000
    dimse_timeout_ms: int = 60_000
    commit_timeout_ms: int = 30_000
    drain_ms: int = 5_000
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    require_client_cert: bool = False
    allow_cleartext: bool = False
    extra_sop_classes: list[str] = []
    spool_dir: str | None = None
    tcp_nodelay: bool = True
    transfer_syntax_preference: str | list[str] = "as-proposed"
    negotiation_timeout_ms: int = 10_000
    max_pending_connections: int = 64
    max_pending_per_peer: int = 8
    workers: int = 1

    def __post_init__(self) -> None:
        _check_workers(self.workers, self.port)
        _check_port(self.port)
        _check_ae("ae_title", self.ae_title)
        for title in self.calling_ae_titles:
            _check_ae("calling_ae_titles", title)
        if self.max_pdu_length < 0:
            raise ValueError("max_pdu_length must not be negative")
        if self.max_associations < 1:
            raise ValueError("max_associations must be at least 1")
        _positive(network_timeout_ms=self.network_timeout_ms, acse_timeout_ms=self.acse_timeout_ms,
                  dimse_timeout_ms=self.dimse_timeout_ms, commit_timeout_ms=self.commit_timeout_ms)
        if self.drain_ms < 0:
            raise ValueError("drain_ms must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.require_client_cert and not (self.tls and self.tls_ca):
            raise ValueError("require_client_cert needs tls_cert, tls_key and tls_ca")
        if not self.tls and not self.allow_cleartext and not is_loopback(self.host):
            raise ValueError(f"listening on {self.host} without TLS is refused: set tls_cert "
                             "and tls_key, or allow_cleartext = true")
        _check_uids("extra_sop_classes", self.extra_sop_classes)
        _check_preference(self.transfer_syntax_preference)
        _check_pending(self)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def preferred_transfer_syntaxes(self) -> tuple[str, ...]:
        """``transfer_syntax_preference`` as the UIDs preferred, in order (a preset's or
        the listed ones; empty: as proposed)."""
        preference = self.transfer_syntax_preference
        if isinstance(preference, str):
            return PREFERENCE_PRESETS[preference]
        return tuple(preference)


def _check_preference(preference: str | list[str]) -> None:
    key = "transfer_syntax_preference"
    if isinstance(preference, str):
        if preference not in PREFERENCE_PRESETS:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, PREFERENCE_PRESETS))} "
                             f"or a list of transfer syntax UIDs, not {preference!r}")
        return
    _check_uids(key, preference)
    for value in preference:
        if value not in ACCEPTED_TRANSFER_SYNTAXES:
            raise ValueError(f"{key}: {value} is not a transfer syntax the listener accepts")
    if len(set(preference)) != len(preference):
        raise ValueError(f"{key} lists a transfer syntax twice")


def _check_pending(cfg: ListenConfig) -> None:
    _positive(negotiation_timeout_ms=cfg.negotiation_timeout_ms)
    for key in ("max_pending_connections", "max_pending_per_peer"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be at least 1")
    if cfg.max_pending_per_peer > cfg.max_pending_connections:
        raise ValueError(f"max_pending_per_peer ({cfg.max_pending_per_peer}) cannot exceed "
                         f"max_pending_connections ({cfg.max_pending_connections})")


def _check_workers(workers: int, port: int) -> None:
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if workers > 1 and port == 0:  # each process would get its own ephemeral port
        raise ValueError(f"workers = {workers} needs a fixed port: the processes cannot "
                         "share an ephemeral one (port = 0)")


class PacsConfig(Config, kw_only=True):
    """One C-STORE destination (e.g. the ``[pacs]`` table).

    Attributes:
        host, port: the PACS. Must be in ``[egress] allowed_tcp``.
        ae_title: our (calling) AE title; called_ae_title: the PACS's.
        timeout_ms: connect, association, DIMSE and network timeout.
        max_pdu_length: largest PDU we accept from the PACS (0 = unlimited); what we send is
            bounded by the PACS's own maximum.
        max_associations: parallel associations to this PACS.
        idle_release_ms: an association unused this long is released.
        tls: connect with TLS 1.2+; the PACS is verified against ``tls_ca`` (or the system
            store) and its certificate must name ``tls_server_name`` (default: host) unless
            ``tls_check_hostname = false``. ``tls_cert``/``tls_key``: our client certificate.
        sop_classes, transfer_syntaxes: what ``flow check --probe`` asks the PACS about.
        spool_dir: where objects over 16 MiB that are not plain files (the Store's encrypted
            spool) are staged in clear for the duration of one send (default: the system
            temporary directory); smaller ones are staged in memory.
    """

    host: str
    port: int
    ae_title: str = "DICOMFLOW"
    called_ae_title: str
    timeout_ms: int = 30_000
    max_pdu_length: int = DEFAULT_PDU
    max_associations: int = 2
    idle_release_ms: int = 5_000
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    tls_check_hostname: bool = True
    sop_classes: list[str] = msgspec.field(default_factory=lambda: list(COMMON_SOP_CLASSES))
    transfer_syntaxes: list[str] = msgspec.field(
        default_factory=lambda: list(COMMON_TRANSFER_SYNTAXES))
    spool_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        _check_port(self.port)
        _check_ae("ae_title", self.ae_title)
        _check_ae("called_ae_title", self.called_ae_title)
        _positive(timeout_ms=self.timeout_ms, idle_release_ms=self.idle_release_ms)
        if self.max_pdu_length < 0:
            raise ValueError("max_pdu_length must not be negative")
        if self.max_associations < 1:
            raise ValueError("max_associations must be at least 1")
        if (self.tls_ca or self.tls_cert or self.tls_key or self.tls_server_name) and not self.tls:
            raise ValueError("tls_ca/tls_cert/tls_key/tls_server_name need tls = true")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        _check_uids("sop_classes", self.sop_classes)
        _check_uids("transfer_syntaxes", self.transfer_syntaxes)
