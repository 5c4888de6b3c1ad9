"""dicomflow's nodes: the DICOM, DICOMweb and HL7 knowledge the runtime (``flow``) lacks.

Importing any of them declares to the runtime's log filter which field names are
routing-safe identifiers (DESIGN.md, "PHI rules") and which third-party loggers the nodes
bring (their text is withheld at INFO+, see ``flow._log``).
"""

import importlib
import sys
from collections.abc import Callable
from typing import Any

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


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` (PEP 562): ``package.NAME`` imports the submodule
    ``where[NAME]`` (relative to ``package``) on first use and returns its ``NAME``.

    For the packages that ``flow`` imports in every process for their operator commands
    (entry points ``flow.commands``): their nodes, and pynetdicom, pydicom and LMDB behind
    them, are imported only by a graph (or a command) that uses them.
    """
    def __getattr__(name: str) -> Any:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    return __getattr__
