"""DICOM DIMSE on pynetdicom: the listener (C-STORE/C-ECHO SCP) and the C-STORE sender.

``DicomListener`` (site table ``[listen]``, :class:`ListenConfig`) acknowledges an object
only after the Store committed it; ``CStoreSender`` (e.g. ``[pacs]``, :class:`PacsConfig`)
forwards stored objects byte for byte and settles each delivery with
:func:`classify_status`. The pure parts — status classification, Part 10 file meta — need
no socket. See docs/operations-dimse.md for keys, status codes and the outcome table.
"""

from .. import lazy_exports

# Imported on first use: `flow` imports this package in every process for `flow echo`.
__getattr__ = lazy_exports(__name__, {
    "ListenConfig": ".config", "PacsConfig": ".config",
    "DicomListener": ".listener",
    "CStoreSender": ".sender",
    "FileMeta": "..dicom.filemeta", "NotPart10": "..dicom.filemeta",
    "encode_file_meta": "..dicom.filemeta", "parse_file_meta": "..dicom.filemeta",
    "LISTENER_STATUS": ".status", "classify_rejection": ".status",
    "classify_status": ".status",
})

__all__ = ["CStoreSender", "DicomListener", "FileMeta", "LISTENER_STATUS", "ListenConfig",
           "NotPart10", "PacsConfig", "classify_rejection", "classify_status",
           "encode_file_meta", "parse_file_meta"]
