"""DICOM at the byte level (PS3.5, PS3.10): the one place that reads element headers.

Every lane reads DICOM bytes through this package; each piece is pure (bytes in, values out)
and held to pydicom by one test module (tests/nodes/dicom/test_dicom_bytes.py).

- ``elements``: the tag and VR constants, :func:`element_header`, :func:`skip_undefined`
  (an undefined-length value), :func:`walk` (top-level elements up to a stop tag) and
  :func:`check_complete` (does a data set end inside an element?);
- ``filemeta``: the Part 10 file meta group: :func:`encode_file_meta`,
  :func:`meta_elements`, :func:`parse_file_meta`, :func:`read_file_meta`;
- ``envelope``: the routing envelope of a received data set: :func:`scan_envelope` from its
  element headers, :func:`read_envelope` with pydicom for what the scan does not read;
- ``items``: sequence items read from a raw sequence's bytes (:class:`RawItem`), text
  decoded as pydicom decodes it;
- ``header``: :func:`read_header`, a stored object's header as pydicom's Dataset (its own
  fast reader, dcmread for what it does not read), and :func:`header_for_edit` /
  :func:`rewrite` for header transforms.
"""

from .elements import (CutShort, Unscannable, check_complete, element_header, skip_undefined,
                       walk)
from .envelope import ENVELOPE_KEYWORDS, read_envelope, scan_envelope
from .filemeta import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, FileMeta,
                       MetaCutShort, NotPart10, encode_file_meta, meta_elements, parse_file_meta,
                       read_file_meta)
from .header import (TruncatedObject, dcmread_header, header_for_edit, read_header, rewrite,
                     stashed_items)
from .items import RawItem, Unsupported, parse_items, sequence_items

__all__ = [
    "CutShort", "ENVELOPE_KEYWORDS", "FileMeta", "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME", "MetaCutShort", "NotPart10", "RawItem", "TruncatedObject",
    "Unscannable", "Unsupported", "check_complete", "dcmread_header", "element_header",
    "encode_file_meta", "header_for_edit", "meta_elements", "parse_file_meta", "parse_items",
    "read_envelope", "read_file_meta", "read_header", "rewrite", "scan_envelope", "sequence_items",
    "skip_undefined", "stashed_items", "walk",
]
