"""Routing inside a lane: filters (plain predicates of the header) and header transforms.

Both nodes sit between a Store pump and a sender and pass :class:`~nodes.delivery.Delivery`
items on. Reading a header parses up to Pixel Data only, in a worker thread.

``Filter(predicate)``
    Ports: in → out. A delivery whose header makes ``predicate(ds)`` true goes on unchanged;
    any other is settled :class:`~nodes.outcome.Skipped` (final: the lane has nothing to do
    for it). A predicate that raises, or a header that cannot be parsed, settles the
    delivery :class:`~nodes.outcome.Permanent` with the error class: the lane goes on.
    A predicate marked :func:`envelope_predicate` is called with the delivery's
    :class:`~nodes.arrival.Envelope` (SOP class, modality, study/series UIDs, AE titles)
    instead, and no header is read at all.

``Transform(transform)``
    Ports: in → out. Applies a versioned :class:`HeaderTransform` to the header and passes on
    a derived delivery whose bytes are the new header followed by the original bytes from
    Pixel Data on (never decoded, never loaded whole). The audit note
    ``transform NAME VERSION`` travels with the delivery to its outcome.

Cancellation: both hold at most one delivery; a crash or cancellation leaves it unsettled
for the Store to retry. A filter's skips (up to ``PENDING_SKIPS``) are settled beside the
lane, each commit shielded so that it lands during a graceful stop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import trio
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from flow import Node

from .arrival import Envelope
from .delivery import Delivery
from .dicom.header import header_for_edit, read_header, rewrite
from .outcome import Permanent, Skipped

# Storage SOP Classes whose objects are reports (PS3.4 B.5): Basic Text, Enhanced,
# Comprehensive, Comprehensive 3D and Extensible SR. Dose reports, CAD and key object
# selections are SR-encoded too but are not reports a RIS wants.
SR_REPORT_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.35",
})


P = TypeVar("P", bound=Callable[..., bool])


def envelope_predicate(fn: P) -> P:
    """Mark a routing predicate that needs only the envelope: a :class:`Filter` then calls
    it with the delivery's :class:`~nodes.arrival.Envelope` and reads no header (a pydicom
    parse per object saved on a lane that sees every object)."""
    fn.reads_envelope = True  # type: ignore[attr-defined]
    return fn


@envelope_predicate
def is_structured_report(item: Dataset | Envelope) -> bool:
    """True for Basic Text, Enhanced, Comprehensive (3D) and Extensible SR reports. Takes a
    header or an envelope."""
    if isinstance(item, Envelope):
        return item.sop_class_uid in SR_REPORT_CLASSES
    return str(item.get("SOPClassUID", "")) in SR_REPORT_CLASSES


def _label(fn: Callable[..., object]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


PENDING_SKIPS = 64  # skips awaiting the Store's commit before the filter takes no more


class Filter(Node):
    """Pass on only deliveries whose header satisfies ``predicate`` (see module docstring)."""

    def __init__(self, predicate: Callable[[Dataset], bool], *, name: str | None = None,
                 **kw) -> None:
        super().__init__(name=name or f"filter_{_label(predicate)}", **kw)
        self.predicate = predicate

    async def run(self, ctx) -> None:
        by_envelope = getattr(self.predicate, "reads_envelope", False)
        # Skips are settled beside the lane, not in its path: a lane that skips most objects
        # would otherwise wait for one commit per object, in turn (with lane writes lingering
        # for a shared commit round, a linger each).
        pending = trio.Semaphore(PENDING_SKIPS)
        async with trio.open_nursery() as skips:
            async for delivery in ctx.receive():
                try:
                    if by_envelope:
                        keep = bool(self.predicate(delivery.envelope))
                    else:
                        header = await trio.to_thread.run_sync(read_header, delivery.payload)
                        keep = bool(self.predicate(header))
                except Exception as exc:
                    await delivery.settle(Permanent(
                        f"filter {self.name}: {type(exc).__name__}"))
                    continue
                if keep:
                    await ctx.send(delivery)
                else:
                    await pending.acquire()
                    skips.start_soon(self._skip, delivery, pending)

    async def _skip(self, delivery, pending: trio.Semaphore) -> None:
        try:
            with trio.CancelScope(shield=True):  # a short commit: let it land at a stop
                await delivery.settle(Skipped(f"filter {self.name}"))
        finally:
            pending.release()


class HeaderTransform:
    """A site's header coercion, versioned like a Handler: subclass, set ``name`` and
    ``version``, and edit the header in :meth:`apply` (never Pixel Data)."""

    name: str = ""
    version: str = "0"

    def apply(self, ds: Dataset) -> None:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"{self.name or type(self).__name__} {self.version}"


class SetElements(HeaderTransform):
    """Set header elements by keyword, e.g. ``SetElements(InstitutionName="Site A")``;
    ``prefix`` adds text in front of an element's current value instead
    (``SetElements(prefix={"StationName": "EXT-"})``)."""

    name = "set-elements"
    version = "1"

    def __init__(self, *, prefix: dict[str, str] | None = None, **values: str) -> None:
        self.values = values
        self.prefix = prefix or {}
        for keyword in [*values, *self.prefix]:
            if keyword == "PixelData" or not _is_keyword(keyword):
                raise ValueError(f"{keyword!r} is not a header element keyword")

    def apply(self, ds: Dataset) -> None:
        for keyword, value in self.values.items():
            setattr(ds, keyword, value)
        for keyword, text in self.prefix.items():
            current = str(ds.get(keyword, "") or "")
            if not current.startswith(text):
                setattr(ds, keyword, text + current)


def _is_keyword(keyword: str) -> bool:
    return tag_for_keyword(keyword) is not None


class Transform(Node):
    """Apply a :class:`HeaderTransform` to each delivery's header (see module docstring)."""

    def __init__(self, transform: HeaderTransform, *, name: str | None = None, **kw) -> None:
        if inspect.isclass(transform):
            raise TypeError("Transform needs a HeaderTransform instance, not the class")
        super().__init__(name=name or "transform", **kw)
        self.transform = transform

    def _apply(self, delivery: Delivery):
        ds, offset = header_for_edit(delivery.payload)
        self.transform.apply(ds)
        if "PixelData" in ds and offset is not None:
            raise ValueError("a header transform must not add Pixel Data")
        return rewrite(delivery.payload, ds, offset)

    async def run(self, ctx) -> None:
        async for delivery in ctx.receive():
            try:
                payload = await trio.to_thread.run_sync(self._apply, delivery)
            except Exception as exc:
                await delivery.settle(Permanent(
                    f"transform {self.transform.label}: {type(exc).__name__}"))
                continue
            await ctx.send(delivery.derive(payload, note=f"transform {self.transform.label}"))
