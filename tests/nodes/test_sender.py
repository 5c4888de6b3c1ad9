"""The sender base: every sender reports the same shape, its figures in a fixed order.

``flow status`` and the admin endpoint read ``report()``; its keys are a contract.
"""

from __future__ import annotations

from nodes.dimse import CStoreSender, PacsConfig
from nodes.fhir.sender import FhirConfig, FhirStudySender
from nodes.hl7 import MllpSender, RisConfig
from nodes.sender import HttpSender, Sender, TcpSender, count
from nodes.stow import StowConfig, StowSender


async def _no_members(study_uid: str) -> list:
    return []


def _senders() -> dict[str, Sender]:
    return {
        "dimse": CStoreSender(PacsConfig(host="127.0.0.1", port=11112, called_ae_title="PACS")),
        "stow": StowSender(StowConfig(url="http://127.0.0.1:8042/dicom-web")),
        "mllp": MllpSender(RisConfig(host="127.0.0.1")),
        "fhir": FhirStudySender(FhirConfig(url="http://127.0.0.1:8080/fhir"), _no_members),
    }


def test_every_sender_reports_each_lane_with_its_figures_in_a_fixed_order():
    expected = {
        "dimse": ["delivered", "transient", "permanent", "bytes", "in_flight", "associations",
                  "open_associations"],
        "stow": ["batches", "delivered", "transient", "permanent", "skipped", "bytes",
                 "in_flight"],
        "mllp": ["sent", "delivered", "transient", "permanent", "reconnects"],
        "fhir": ["studies_sent", "delivered", "transient", "permanent", "skipped",
                 "pending_studies", "held"],
    }
    for kind, sender in _senders().items():
        assert sender.report() == {"lanes": {}}, kind
        sender.lane_stats("pacs")
        (lane, figures), = sender.report()["lanes"].items()
        assert lane == "pacs" and list(figures) == expected[kind], kind
        assert set(figures.values()) == {0}, kind


def test_lane_figures_survive_a_restart_and_count_what_the_lane_had_not_got():
    sender = MllpSender(RisConfig(host="127.0.0.1"))
    stats = sender.lane_stats("ris")
    count(stats, "delivered", 3)
    count(stats, "skipped")  # not one of MLLP's counters: created when first counted
    assert sender.lane_stats("ris") is stats  # a restarted run keeps the lane's figures
    figures = sender.report()["lanes"]["ris"]
    assert figures["delivered"] == 3 and figures["skipped"] == 1


def test_egress_comes_from_the_config():
    senders = _senders()
    for kind in ("dimse", "mllp"):
        assert isinstance(senders[kind], TcpSender)
        (target,) = senders[kind].egress()
        assert target.host == "127.0.0.1"
    assert senders["mllp"].peer_address == f"127.0.0.1:{senders['mllp'].config.port}"
    for kind in ("stow", "fhir"):
        assert isinstance(senders[kind], HttpSender)
        (target,) = senders[kind].egress()
        assert target.url == senders[kind].config.url
