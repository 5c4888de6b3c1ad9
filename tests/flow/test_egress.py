"""The fail-closed allowlist: literal matching, prefixes on segment boundaries."""

import pytest

from flow import ConfigError, EgressConfig, EgressDenied, EgressPolicy, HttpTarget, TcpTarget


def policy(tcp=(), http=()):
    return EgressPolicy(EgressConfig(allowed_tcp=list(tcp), allowed_http=list(http)))


def test_tcp_needs_exact_host_and_port():
    p = policy(tcp=["127.0.0.1:2575", "PACS.example:104"])
    assert p.allows(TcpTarget("127.0.0.1", 2575))
    assert p.allows(TcpTarget("pacs.EXAMPLE", 104))
    assert not p.allows(TcpTarget("127.0.0.1", 2576))
    assert not p.allows(TcpTarget("127.0.0.2", 2575))


def test_http_prefix_matches_on_segment_boundary_with_default_ports():
    p = policy(http=["http://127.0.0.1:8042/dicom-web", "https://fhir.example/r4/"])
    assert p.allows(HttpTarget("http://127.0.0.1:8042/dicom-web"))
    assert p.allows(HttpTarget("http://127.0.0.1:8042/dicom-web/studies"))
    assert not p.allows(HttpTarget("http://127.0.0.1:8042/dicom-webx/studies"))
    assert not p.allows(HttpTarget("https://127.0.0.1:8042/dicom-web/studies"))
    assert not p.allows(HttpTarget("http://127.0.0.1:8043/dicom-web/studies"))
    assert p.allows(HttpTarget("https://fhir.example:443/r4/ImagingStudy?identifier=x"))
    assert not p.allows(HttpTarget("http://fhir.example/r4/ImagingStudy"))


def test_empty_policy_permits_nothing_and_says_so():
    with pytest.raises(EgressDenied, match="empty, which permits nothing"):
        policy().check_http("http://127.0.0.1:8042/dicom-web")


def test_malformed_entries_name_their_key():
    with pytest.raises(ConfigError, match=r"egress.allowed_tcp\[1\]"):
        policy(tcp=["127.0.0.1:1", "nohostport"])
    with pytest.raises(ConfigError, match=r"egress.allowed_http\[0\]"):
        policy(http=["ftp://x/y"])


def test_credentials_never_appear_in_refusals():
    with pytest.raises(EgressDenied) as info:
        policy(http=["http://a:1/x"]).check_http("http://user:secret@b:2/y")
    assert "secret" not in str(info.value)
