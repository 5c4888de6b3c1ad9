"""ToHL7: the lane node that runs a Handler on each delivery.

Ports: in → out. For each :class:`~nodes.delivery.Delivery` it reads the header (up to Pixel
Data, in a worker thread), calls the handler there too, and

- passes on ``delivery.derive(BytesPayload(er7), note="handler NAME VERSION",
  media_type="x-application/hl7-v2+er7")`` when the handler returned a message (the ER7 bytes in
  the character set MSH-18 declares; when the text does not fit that set, MSH-18 becomes
  ``UNICODE UTF-8`` unless the handler set another ``Message.charset_fallback``);
- settles :class:`~nodes.outcome.Skipped` ``handler NAME VERSION: skipped`` when it returned
  None (with the same note: the audit shows which handler version decided);
- settles :class:`~nodes.outcome.Permanent` ``handler NAME VERSION: ErrorClass`` when the
  header cannot be read or the handler raised: that object is dead-lettered, the lane goes
  on with the next one. The reason names the exception class only: its message may quote
  the dataset.

Cancellation: the node holds one delivery at a time; cancelled, it leaves it unsettled for
the Store to re-queue.
"""

from __future__ import annotations

import inspect

import trio

from flow import Node, get_logger

from ..delivery import Delivery
from ..outcome import Permanent, Skipped
from ..payload import BytesPayload
from .fields import UTF8
from .handlers import Handler
from .mllp import MEDIA_TYPE
from .model import Message
from ..dicom.header import read_header

log = get_logger("nodes.hl7")


class HeaderUnreadable(Exception):
    """The delivery's bytes are not a DICOM object pydicom can read (the class is the reason)."""


def _read_header(delivery: Delivery):
    try:
        return read_header(delivery.payload)
    except Exception as exc:  # any parse failure is one bad object, not a node failure
        raise HeaderUnreadable(type(exc).__name__) from None


def map_delivery(handler: Handler, delivery: Delivery) -> bytes | None:
    """Blocking: header → handler → ER7 bytes (None: the handler skipped the object)."""
    ds = _read_header(delivery)
    message = handler.handle(ds)
    if message is None:
        return None
    if not isinstance(message, Message):
        raise TypeError("a Handler returns nodes.hl7.Message or None")
    if message.charset_fallback is None:
        # A handler that declared no MSH-18 (or the wrong one) still sends a name with
        # non-ASCII letters, in UTF-8 and saying so, rather than dead-lettering the report.
        message.charset_fallback = UTF8
    return message.encode()


class ToHL7(Node):
    """Run ``handler`` on every delivery of the lane (see the module docstring)."""

    def __init__(self, handler: Handler, *, name: str | None = None, **kw) -> None:
        if inspect.isclass(handler):
            raise TypeError("ToHL7 needs a Handler instance, not the class")
        if not callable(getattr(handler, "handle", None)):
            raise TypeError("a Handler has a handle(ds) method")
        super().__init__(name=name or "to_hl7", **kw)
        self.handler = handler

    @property
    def label(self) -> str:
        name = getattr(self.handler, "name", "") or type(self.handler).__name__
        return f"{name} {getattr(self.handler, 'version', '0')}"

    async def run(self, ctx) -> None:
        label = self.label
        note = f"handler {label}"
        async for delivery in ctx.receive():
            try:
                er7 = await trio.to_thread.run_sync(map_delivery, self.handler, delivery)
            except HeaderUnreadable as exc:
                log.warning("hl7.unreadable", lane=ctx.lane, sop_instance_uid=delivery.uid,
                            handler=label, error_class=exc.args[0])
                outcome: Permanent | Skipped = Permanent(
                    f"{note}: unreadable header ({exc.args[0]})")
            except Exception as exc:
                log.warning("hl7.handler_failed", lane=ctx.lane, sop_instance_uid=delivery.uid,
                            handler=label, error_class=type(exc).__name__)
                outcome = Permanent(f"{note}: {type(exc).__name__}")
            else:
                if er7 is not None:
                    await ctx.send(delivery.derive(BytesPayload(er7), note=note,
                                                   media_type=MEDIA_TYPE))
                    continue
                outcome = Skipped(f"{note}: skipped")
            # settled through a derivation so the audit keeps the handler version whatever
            # became of the object (the settlement is shared with the original)
            await delivery.derive(delivery.payload, note=note).settle(outcome)
