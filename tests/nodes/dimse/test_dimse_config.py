"""[listen] and [pacs] tables: defaults, and mistakes refused when the site file loads."""

from __future__ import annotations

import pytest

from flow import ConfigError
from flow._config import convert
from nodes.dimse import DicomListener, ListenConfig, PacsConfig


def _listen(**raw):
    return convert({"port": 11112, "ae_title": "DICOMFLOW", **raw}, ListenConfig,
                   source="site.toml", prefix="listen")


def test_listen_defaults_are_loopback_and_strict():
    cfg = _listen()
    assert (cfg.host, cfg.calling_ae_titles, cfg.strict_called_ae, cfg.tls) == (
        "127.0.0.1", [], True, False)
    assert cfg.max_pdu_length == 131072 and cfg.tcp_nodelay
    assert (cfg.negotiation_timeout_ms, cfg.max_pending_connections,
            cfg.max_pending_per_peer) == (10_000, 64, 8)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "pacs.example.org", "::"])
def test_non_loopback_cleartext_listener_is_refused_at_start(host):
    with pytest.raises(ConfigError, match="without TLS is refused"):
        _listen(host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_tls(host):
    assert _listen(host=host).host == host


def test_cleartext_elsewhere_only_when_explicitly_allowed():
    assert _listen(host="0.0.0.0", allow_cleartext=True).allow_cleartext
    assert _listen(host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem").tls


@pytest.mark.parametrize("raw,message", [
    ({"ae_title": "A" * 17}, "ae_title"),
    ({"ae_title": "BAD\\AE"}, "ae_title"),
    ({"calling_ae_titles": [""]}, "calling_ae_titles"),
    ({"port": 0}, "port"),
    ({"tls_cert": "c.pem"}, "tls_cert and tls_key"),
    ({"require_client_cert": True, "tls_cert": "c", "tls_key": "k"}, "require_client_cert"),
    ({"extra_sop_classes": ["1.2.x"]}, "extra_sop_classes"),
    ({"calling_ae_title": ["X"]}, "unknown key listen.calling_ae_title"),
    ({"negotiation_timeout_ms": 0}, "negotiation_timeout_ms must be positive"),
    ({"max_pending_connections": 0}, "max_pending_connections must be at least 1"),
    ({"max_pending_per_peer": 0}, "max_pending_per_peer must be at least 1"),
    ({"max_pending_per_peer": 9, "max_pending_connections": 8},
     "max_pending_per_peer .9. cannot exceed max_pending_connections .8."),
])
def test_listen_mistakes_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("\\", "\\\\")):
        _listen(**raw)


def test_pacs_keys_and_checks():
    cfg = convert({"host": "127.0.0.1", "port": 11113, "ae_title": "DICOMFLOW",
                   "called_ae_title": "PACS"}, PacsConfig, source="site.toml", prefix="pacs")
    assert (cfg.max_associations, cfg.idle_release_ms, cfg.tls) == (2, 5000, False)
    assert len(cfg.sop_classes) * len(cfg.transfer_syntaxes) <= 127
    with pytest.raises(ConfigError, match="need tls = true"):
        convert({"host": "h", "port": 1, "called_ae_title": "P", "tls_ca": "ca.pem"},
                PacsConfig, source="site.toml", prefix="pacs")
    with pytest.raises(ConfigError, match="missing key pacs.called_ae_title"):
        convert({"host": "h", "port": 1}, PacsConfig, source="site.toml", prefix="pacs")


async def test_unreadable_tls_files_fail_the_start(tmp_path):
    listener = DicomListener(_listen(tls_cert=str(tmp_path / "nope.pem"),
                                     tls_key=str(tmp_path / "nope.key")))
    with pytest.raises(ConfigError, match="tls_cert/tls_key"):
        await listener.open()


def test_transfer_syntax_preference_presets_and_lists():
    assert _listen().preferred_transfer_syntaxes == ()  # "as-proposed"
    assert _listen(transfer_syntax_preference="explicit-little-endian-first"
                   ).preferred_transfer_syntaxes == ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    listed = ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"]
    assert _listen(transfer_syntax_preference=listed).preferred_transfer_syntaxes == \
        tuple(listed)


@pytest.mark.parametrize("value,message", [
    ("compressed-first", "transfer_syntax_preference must be one of 'as-proposed', "
                         "'explicit-little-endian-first' or a list of transfer syntax UIDs"),
    (["1.2.840.10008.1.2.1", "JPEGLSLossless"], "transfer_syntax_preference: 'JPEGLSLossless' "
                                                "is not a UID"),
    (["1.2.840.10008.5.1.4.1.1.2"], "transfer_syntax_preference: 1.2.840.10008.5.1.4.1.1.2 "
                                    "is not a transfer syntax the listener accepts"),
    (["1.2.840.10008.1.2", "1.2.840.10008.1.2"], "lists a transfer syntax twice"),
    (7, "listen.transfer_syntax_preference"),
])
def test_a_bad_transfer_syntax_preference_names_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        _listen(transfer_syntax_preference=value)
