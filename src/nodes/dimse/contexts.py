"""Which SOP classes and transfer syntaxes the DIMSE nodes accept or probe for.

Objects are stored and forwarded in the transfer syntax they arrived in, so the listener
accepts every transfer syntax pynetdicom/pydicom know by UID: it never has to decode one.
Which of several syntaxes proposed in one presentation context it accepts is the
requestor's choice (:func:`syntax_order`), unless the site sets a preference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pydicom.uid as uid
from pynetdicom import AllStoragePresentationContexts

# Every transfer syntax a modality may send. The order matters only to pynetdicom's own
# negotiation, which the listener replaces per association (``acceptor_contexts`` in
# ``_pynetdicom``).
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


# ``[listen] transfer_syntax_preference`` presets: the syntaxes preferred, in order, before
# the requestor's own order decides.
PREFERENCE_PRESETS: dict[str, tuple[str, ...]] = {
    "as-proposed": (),
    "explicit-little-endian-first": (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian),
}


def syntax_order(proposals: Sequence[Sequence[str]], accepted: Iterable[str],
                 preference: Sequence[str] = ()) -> list[str]:
    """One acceptor order of transfer syntaxes for one SOP class that gives each of that
    class's proposed presentation contexts the syntax it should get.

    pynetdicom accepts, per proposed context, the first syntax of the *acceptor's* list that
    the context proposes, and keeps one list per SOP class. This order makes that choice:
    the first syntax of ``preference`` the context proposes, else the context's own first
    proposed syntax that is ``accepted``. Only when two contexts of one class contradict
    each other (A before B in one, B before A in the other) does the earlier context win.
    The result holds every accepted syntax that is proposed, nothing else.
    """
    allowed = set(accepted)
    contexts = [[ts for ts in dict.fromkeys(proposal) if ts in allowed]
                for proposal in proposals]
    contexts = [c for c in contexts if c]
    preferred = [ts for ts in dict.fromkeys(preference) if any(ts in c for c in contexts)]
    # The rest: a topological order of "a context's first choice before its other
    # syntaxes", ties (and cycles) broken by first appearance in the proposal.
    rest = [ts for ts in dict.fromkeys(ts for c in contexts for ts in c) if ts not in preferred]
    after: dict[str, set[str]] = {ts: set() for ts in rest}
    for c in contexts:
        if not any(ts in preferred for ts in c):
            after[c[0]].update(ts for ts in c[1:] if ts != c[0])
    before = {ts: 0 for ts in rest}
    for ts in rest:
        for later in after[ts]:
            before[later] += 1
    order: list[str] = []
    left = list(rest)
    while left:
        ready = next((ts for ts in left if before[ts] == 0), left[0])  # left[0]: a cycle
        left.remove(ready)
        order.append(ready)
        for later in after[ready]:
            before[later] -= 1
    return preferred + order
