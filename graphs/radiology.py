"""The flagship site graph: receive, commit, then route to PACS, archive, RIS (and FHIR).

    DicomListener ─▶ Store ─┬─ pacs    : CStoreSender                          (C-STORE)
                            ├─ archive : Transform(site coercion) ─▶ StowSender (STOW-RS)
                            ├─ ris     : Filter(SR) ─▶ ToHL7(SR report) ─▶ MllpSender
                            └─ fhir    : FhirStudySender            (only with a [fhir] table)

Run it with ``flow graphs/radiology.py --config graphs/radiology.toml``. Addresses, AE titles,
TLS files and the egress allowlist live in the TOML; topology and logic live here.
"""

from flow import Config, Graph
from nodes.dimse import CStoreSender, DicomListener, ListenConfig, PacsConfig
from nodes.fhir import FhirConfig, FhirStudySender
from nodes.hl7 import MllpSender, RisConfig, SRReportHandler, ToHL7
from nodes.route import Filter, SetElements, Transform, is_structured_report
from nodes.store import Store, StoreConfig
from nodes.stow import StowConfig, StowSender


class ArchiveCoercion(Config):
    """Header coercion applied to the archive's copy only (the PACS gets objects as received)."""

    institution_name: str | None = None
    station_name_prefix: str | None = None


class Site(Config, kw_only=True):
    data_dir: str = "var/dicomflow"
    listen: ListenConfig
    store: StoreConfig = StoreConfig()
    pacs: PacsConfig
    archive: StowConfig
    archive_coercion: ArchiveCoercion = ArchiveCoercion()
    ris: RisConfig
    fhir: FhirConfig | None = None


site = Graph.config(Site)

store = Store(site.data_dir, site.store)


def archive_lane():
    coercion = site.archive_coercion
    values = {"InstitutionName": coercion.institution_name} if coercion.institution_name else {}
    prefix = {"StationName": coercion.station_name_prefix} if coercion.station_name_prefix else {}
    sender = StowSender(site.archive)
    if not (values or prefix):
        return sender
    return Transform(SetElements(prefix=prefix, **values), name="archive_coercion") >> sender


lanes = {
    "pacs": CStoreSender(site.pacs),
    "archive": archive_lane(),
    "ris": Filter(is_structured_report, name="only_reports")
    >> ToHL7(SRReportHandler(site.ris), name="sr_to_oru")
    >> MllpSender(site.ris),
}
if site.fhir is not None:
    lanes["fhir"] = FhirStudySender(site.fhir, store.study_members)

graph = Graph(DicomListener(site.listen) >> store >> lanes,
              name="radiology", state_dir=site.data_dir)
