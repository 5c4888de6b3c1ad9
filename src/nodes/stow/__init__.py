"""DICOMweb STOW-RS: send stored DICOM objects to an archive, batched and streamed.

``StowSender`` is the node; ``StowConfig`` its site-config table. The pure parts —
multipart framing and response → outcome classification — are importable on their own and
need no socket. See docs/operations-stow.md for keys and the outcome table.
"""

from .multipart import decode_multipart, encode_multipart
from .response import parse_stow_response
from .sender import StowConfig, StowSender

__all__ = ["StowConfig", "StowSender", "decode_multipart", "encode_multipart",
           "parse_stow_response"]
