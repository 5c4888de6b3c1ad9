"""dicomflow's nodes: the DICOM, DICOMweb and HL7 knowledge the runtime (``flow``) lacks.

Importing any of them declares to the runtime's log filter which field names are
routing-safe identifiers (DESIGN.md, "PHI rules") and which third-party loggers the nodes
bring (their text is withheld at INFO+, see ``flow._log``).
"""

from flow import register_foreign, register_safe_fields

register_safe_fields(
    # transports and outcomes (DESIGN.md, "PHI rules": peer address, status codes)
    "peer", "host", "port", "bytes", "ms", "duration_ms", "http_status", "status", "outcome",
    "attempt",
    # DICOM: UIDs, AE titles, the transfer syntax
    "sop_instance_uid", "sop_class_uid", "transfer_syntax", "calling_ae", "called_ae",
    "ae_title",
    # HL7 and routing: handler/transform names, batch figures, acknowledgement codes
    "handler", "transform", "batch", "instances", "ack_code", "control_id",
)
register_foreign("pynetdicom", "pydicom", "hl7apy", "httpx", "httpcore")
