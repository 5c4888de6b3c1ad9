"""Which SOP classes and transfer syntaxes the DIMSE nodes accept or probe for.

Objects are stored and forwarded in the transfer syntax they arrived in, so the listener
accepts every transfer syntax pynetdicom/pydicom know by UID: it never has to decode one.
"""

from __future__ import annotations

import pydicom.uid as uid
from pynetdicom import AllStoragePresentationContexts

# Every transfer syntax a modality may send; order is the SCP's preference only when a
# peer proposes several in one context (the first proposed that we support wins).
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(dict.fromkeys([
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
    uid.JPEGLSLossless, uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless, uid.JPEG2000, uid.JPEG2000MCLossless, uid.JPEG2000MC,
    uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K,
    uid.RLELossless,
    uid.MPEG2MPML, uid.MPEG2MPMLF, uid.MPEG2MPHL, uid.MPEG2MPHLF,
    uid.MPEG4HP41, uid.MPEG4HP41F, uid.MPEG4HP41BD, uid.MPEG4HP41BDF, uid.MPEG4HP422D,
    uid.MPEG4HP422DF, uid.MPEG4HP423D, uid.MPEG4HP423DF, uid.MPEG4HP42STEREO,
    uid.MPEG4HP42STEREOF, uid.HEVCMP51, uid.HEVCM10P51,
]))

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

# What `flow check --probe` asks a PACS about by default: the classes a radiology site sends
# most, in the syntaxes modalities use most (12 × 9 = 108 contexts: one association).
COMMON_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",       # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",     # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",       # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",     # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.1",       # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",     # Digital X-Ray Image (presentation)
    "1.2.840.10008.5.1.4.1.1.6.1",     # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.7",       # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.88.11",   # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",   # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",   # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.104.1",   # Encapsulated PDF
)
COMMON_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless,
    uid.JPEG2000, uid.RLELossless,
)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255


def uid_name(value: str) -> str:
    """pydicom's name for a UID (e.g. "CT Image Storage"), or the UID itself."""
    name = uid.UID(value).name
    return name if name and name != value else value
