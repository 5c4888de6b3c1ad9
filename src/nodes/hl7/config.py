"""The RIS destination: a site-config table (``[ris]`` in graphs/radiology.toml)."""

from __future__ import annotations

from flow import Config


class RisConfig(Config):
    """Where HL7 v2 messages go, and who they say they are from (MSH-3..6).

    ``tls_ca`` (a PEM file) turns TLS on and verifies the RIS against that CA; ``tls = true``
    turns it on with the system's CAs. Without either, MLLP runs over plain TCP (as most
    RIS interfaces do, inside the hospital network).
    """

    host: str
    port: int = 2575
    sending_application: str = "DICOMFLOW"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    connect_timeout_ms: int = 5_000
    ack_timeout_ms: int = 30_000
    tls: bool = False
    tls_ca: str | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be 1..65535")
        if self.connect_timeout_ms <= 0 or self.ack_timeout_ms <= 0:
            raise ValueError("connect_timeout_ms and ack_timeout_ms must be positive")

    @property
    def use_tls(self) -> bool:
        return self.tls or self.tls_ca is not None
