"""DICOM DIMSE on pynetdicom: the listener (C-STORE/C-ECHO SCP) and the C-STORE sender.

``DicomListener`` (site table ``[listen]``, :class:`ListenConfig`) acknowledges an object
only after the Store committed it; ``CStoreSender`` (e.g. ``[pacs]``, :class:`PacsConfig`)
forwards stored objects byte for byte and settles each delivery with
:func:`classify_status`. The pure parts — status classification, Part 10 file meta — need
no socket. See docs/operations-dimse.md for keys, status codes and the outcome table.
"""

from .config import ListenConfig, PacsConfig
from .listener import DicomListener
from .sender import CStoreSender
from ..dicom.filemeta import FileMeta, NotPart10, encode_file_meta, parse_file_meta
from .status import LISTENER_STATUS, classify_rejection, classify_status

__all__ = ["CStoreSender", "DicomListener", "FileMeta", "LISTENER_STATUS", "ListenConfig",
           "NotPart10", "PacsConfig", "classify_rejection", "classify_status",
           "encode_file_meta", "parse_file_meta"]
