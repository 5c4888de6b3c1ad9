"""The [fhir] site-config table."""

from __future__ import annotations

import msgspec
import pytest

from nodes.fhir import FhirConfig, FhirStudySender


def load(**table) -> FhirConfig:
    return msgspec.convert(table, FhirConfig)


def test_url_is_the_only_required_key_and_defaults_are_sensible():
    cfg = load(url="https://ehr.example/fhir")
    assert (cfg.quiet_time_s, cfg.max_wait_s, cfg.patient_identifier_system, cfg.endpoint,
            cfg.timezone, cfg.tls_ca, cfg.auth_header_file, cfg.auth_header_env) == (
        10.0, 300.0, None, None, None, None, None, None)
    assert cfg.timeout_ms > 0 and cfg.max_connections >= 1
    assert cfg.imaging_study_url == "https://ehr.example/fhir/ImagingStudy"


def test_missing_url_and_unknown_keys_are_refused():
    with pytest.raises(msgspec.ValidationError, match="url"):
        load(quiet_time_s=1)
    with pytest.raises(msgspec.ValidationError, match="quiet_time"):
        load(url="https://ehr.example/fhir", quiet_time=1)


@pytest.mark.parametrize("bad", [
    {"url": "ftp://ehr.example/fhir"}, {"url": "https://u:p@ehr.example/fhir"},
    {"url": "https://ehr.example/fhir", "quiet_time_s": -1},
    {"url": "https://ehr.example/fhir", "max_wait_s": 0},
    {"url": "https://ehr.example/fhir", "timezone": "Nowhere/Atlantis"},
    {"url": "https://ehr.example/fhir", "auth_header_file": "/a", "auth_header_env": "B"},
])
def test_bad_values_are_refused(bad):
    with pytest.raises(msgspec.ValidationError):
        load(**bad)


def test_sender_handler_follows_the_config():
    cfg = load(url="https://ehr.example/fhir", patient_identifier_system="urn:oid:1.2.3",
               endpoint="Endpoint/wado", timezone="Europe/Paris")

    async def members(study_uid):
        return []

    sender = FhirStudySender(cfg, members)
    assert sender.name == "fhir_sender"
    assert sender.handler.patient_identifier_system == "urn:oid:1.2.3"
    assert sender.handler.endpoint == "Endpoint/wado"
    assert str(sender.handler.zone) == "Europe/Paris"
