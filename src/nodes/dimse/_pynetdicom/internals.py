"""What the adapter reaches past pynetdicom's public API for, checked at start.

Each :class:`Internal` names one private name (or one behaviour read off pynetdicom's
source) that a group of the adapter's fast paths relies on. :func:`verify` checks every one
against the pynetdicom in this process: present, callable where called, with the parameter
names the adapter passes, set in ``__init__`` for instance attributes. A group with anything
missing is not used: its callers take pynetdicom's public path (:func:`usable`).

Groups (the table itself is ``INTERNALS`` below; docs/operations-dimse.md lists it too):

- ``receive``: the listener reads C-STORE command sets and data set fragments itself
  (``stores.receive_stores_directly``), the sender C-STORE responses
  (``stores.send_stores_directly``);
- ``answer``: the listener answers C-STOREs with its own encoder
  (``stores.answer_stores_directly``);
- ``send``: the sender writes C-STORE-RQs itself and bounds pynetdicom's send queue
  (``stores.send_stores_directly``, ``bound_send_queue``, ``abort_and_wake``);
- ``spill``: pynetdicom's chunked receive writes into a SpillFile (``dimse_messages``'
  module globals);
- ``contexts``: presentation contexts built and copied without re-validating their UIDs;
- ``budget``: the connection budget's server (``server.BudgetedServer``);
- ``reactor``: both loops of an association wait for work instead of polling every
  millisecond (:mod:`.reactor`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GROUPS = ("receive", "answer", "send", "spill", "contexts", "budget", "reactor")


@dataclass(frozen=True)
class Internal:
    """One thing the adapter relies on: ``where`` (dotted, for the log) and ``check``
    (True when it is as expected)."""

    group: str
    where: str
    check: Callable[[], bool]
    why: str


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _resolve(dotted: str) -> Any:
    """``pynetdicom.module.Class.attr`` → the object (AttributeError when gone)."""
    import importlib

    module, _, rest = dotted.partition(":")
    obj: Any = importlib.import_module(module)
    for part in rest.split(".") if rest else ():
        obj = getattr(obj, part)
    return obj


def method(dotted: str, *params: str) -> Callable[[], bool]:
    """A callable whose parameters (after ``self``) are named ``params``, in that order."""
    def check() -> bool:
        obj = _resolve(dotted)
        if not callable(obj):
            return False
        names = [p for p in inspect.signature(obj).parameters if p != "self"]
        return names[:len(params)] == list(params)
    return check


def attribute(dotted: str) -> Callable[[], bool]:
    """Present (a module global, a class attribute or property)."""
    def check() -> bool:
        _resolve(dotted)
        return True
    return check


def assigned(dotted_class: str, *names: str) -> Callable[[], bool]:
    """Instance attributes ``names`` that ``__init__`` of the class assigns."""
    def check() -> bool:
        init = _source(_resolve(dotted_class).__init__)
        return all(f"self.{name}" in init for name in names)
    return check


def source_has(dotted: str, *texts: str) -> Callable[[], bool]:
    """Behaviour read off the source of ``dotted``: each of ``texts`` appears in it (for
    a loop :mod:`.reactor` replaces, pynetdicom's own)."""
    def check() -> bool:
        code = _source(_pynetdicoms(dotted))
        return all(text in code for text in texts)
    return check


def _pynetdicoms(dotted: str) -> Any:
    """:func:`_resolve`, seeing past :mod:`.reactor`'s installed replacements."""
    from . import reactor

    module, _, rest = dotted.partition(":")
    owner_path, _, name = rest.rpartition(".")
    if not owner_path:
        return _resolve(dotted)
    return reactor.pynetdicoms(_resolve(f"{module}:{owner_path}"), name)


_A, _D, _DUL = ("pynetdicom.association:Association", "pynetdicom.dimse:DIMSEServiceProvider",
                "pynetdicom.dul:DULServiceProvider")
_MSG = "pynetdicom.dimse_messages"
_SERVICE = "pynetdicom.service_class:StorageServiceClass"

INTERNALS: tuple[Internal, ...] = (
    # receive: the listener's C-STORE reader
    Internal("receive", f"{_D}.receive_primitive", method(f"{_D}.receive_primitive", "primitive"),
             "replaced per association: a plain C-STORE-RQ is read without DIMSEMessage"),
    Internal("receive", f"{_D}.message/msg_queue", assigned(_D, "message", "msg_queue"),
             "the message being decoded; where a decoded request is queued"),
    Internal("receive", f"{_A}._accepted_cx", assigned(_A, "_accepted_cx"),
             "the accepted context (and its transfer syntax) of a request"),
    Internal("receive", f"{_A}.get_handlers", method(f"{_A}.get_handlers", "event"),
             "EVT_DIMSE_RECV subscribers get pynetdicom's own message"),
    Internal("receive", f"{_MSG}:DIMSEMessage.message_to_primitive",
             source_has(f"{_MSG}:DIMSEMessage.message_to_primitive", "_context_id",
                        "_dataset_path", "_dataset_file"),
             "C_STORE._context_id/_dataset_path/_dataset_file: the request as pynetdicom "
             "builds it"),
    Internal("receive", "pynetdicom._config.STORE_RECV_CHUNKED_DATASET",
             attribute("pynetdicom._config:STORE_RECV_CHUNKED_DATASET"),
             "data sets received into a file object, not memory"),
    Internal("receive", "pynetdicom._config.ENFORCE_UID_CONFORMANCE",
             attribute("pynetdicom._config:ENFORCE_UID_CONFORMANCE"),
             "strict UID checks stay pynetdicom's"),
    # answer: the listener's C-STORE writer
    Internal("answer", f"{_A}._serve_request",
             method(f"{_A}._serve_request", "msg", "context_id"),
             "replaced per association: a plain C-STORE is answered without a Dataset"),
    Internal("answer", f"{_A}._sent_release/_is_paused/_accepted_cx",
             assigned(_A, "_sent_release", "_is_paused", "_accepted_cx"),
             "what pynetdicom's _serve_request reads and sets around a request"),
    Internal("answer", f"{_A}._abort_nonblocking",
             method(f"{_A}._abort_nonblocking", "block"),
             "a handler's assoc.abort() must not block (pynetdicom's attempt())"),
    Internal("answer", f"{_A}._abort_blocking", method(f"{_A}._abort_blocking", "block"),
             "restored after the handler"),
    Internal("answer", f"{_A}.get_handlers", method(f"{_A}.get_handlers", "event"),
             "EVT_DIMSE_SENT subscribers get pynetdicom's own message"),
    Internal("answer", f"{_D}.cancel_req", assigned(_D, "cancel_req"),
             "cleared around a request, as _serve_request does"),
    Internal("answer", f"{_D}.maximum_pdu_size", attribute(f"{_D}.maximum_pdu_size"),
             "a response over the peer's PDU size goes through pynetdicom"),
    Internal("answer", f"{_D}.send_msg", method(f"{_D}.send_msg", "primitive", "context_id"),
             "a response pynetdicom builds (status Dataset) is sent its way"),
    Internal("answer", f"{_DUL}.send_pdu", method(f"{_DUL}.send_pdu", "primitive"),
             "the encoded response goes straight to the DUL"),
    Internal("answer", f"{_SERVICE}.SCP/validate_status",
             method(f"{_SERVICE}.validate_status", "status", "rsp"),
             "only the stock Storage SCP is replaced; statuses it builds stay its own"),
    Internal("answer", "pynetdicom._config.UNRESTRICTED_STORAGE_SERVICE",
             attribute("pynetdicom._config:UNRESTRICTED_STORAGE_SERVICE"),
             "which SOP classes the Storage SCP serves"),
    # send: the sender's C-STORE writer and send queue
    Internal("send", f"{_D}.send_msg", method(f"{_D}.send_msg", "primitive", "context_id"),
             "replaced per association: a C-STORE-RQ from a file is written directly"),
    Internal("send", f"{_A}.send_c_store sets C_STORE._dataset_path",
             source_has(f"{_A}.send_c_store", "req._dataset_path = (fpath, offset)"),
             "the file and data set offset of a chunked send"),
    Internal("send", f"{_D}.maximum_pdu_size", attribute(f"{_D}.maximum_pdu_size"),
             "the peer's PDU size decides the fragments"),
    Internal("send", f"{_DUL}.send_pdu", method(f"{_DUL}.send_pdu", "primitive"),
             "fragments go straight to the DUL; wrapped to bound its queue"),
    Internal("send", f"{_DUL}.to_provider_queue/_kill_thread",
             assigned(_DUL, "to_provider_queue", "_kill_thread"),
             "the queue bounded, and a dead DUL thread releases the wait"),
    Internal("send", f"{_D}.msg_queue", assigned(_D, "msg_queue"),
             "a local abort wakes the thread waiting for a response (fsm AA-2/3/4's "
             "(None, None))"),
    Internal("send", f"{_DUL}.to_user_queue", assigned(_DUL, "to_user_queue"),
             "a local abort wakes the thread waiting for the A-ASSOCIATE answer (what the "
             "ACSE timeout gives: None)"),
    Internal("send", f"{_A}.send_c_store's steps",
             source_has(f"{_A}.send_c_store", "split_dataset(fpath)", "_get_valid_context(",
                        "_reactor_checkpoint.clear()", "while not self._is_paused",
                        "self.dimse.send_msg(req", "get_msg(block=True)",
                        "_reactor_checkpoint.set()", "self._handle_no_response()",
                        "_check_received_status(rsp)"),
             "store() takes the same steps for a file whose meta is read already"),
    Internal("send", f"{_A}._handle_no_response/_accepted_cx/_reactor_checkpoint/_is_paused",
             lambda: method(f"{_A}._handle_no_response")() and assigned(
                 _A, "_accepted_cx", "_reactor_checkpoint", "_is_paused")(),
             "what store() reads and calls around a request"),
    Internal("send", "pynetdicom.presentation:PresentationContext.as_scu",
             attribute("pynetdicom.presentation:PresentationContext.as_scu"),
             "the contexts store() may choose, as _get_valid_context(role='scu')"),
    Internal("send", f"{_D}.get_msg(block)", method(f"{_D}.get_msg", "block"),
             "waits for the response up to the DIMSE timeout"),
    Internal("send", "pynetdicom.dimse_primitives:C_STORE.is_valid_response",
             lambda: _response_with(MessageIDBeingRespondedTo=1, Status=0).is_valid_response,
             "a response with Message ID Being Responded To and Status is valid"),
    # spill: pynetdicom's chunked receive into a SpillFile
    Internal("spill", f"{_MSG}.NamedTemporaryFile", attribute(f"{_MSG}:NamedTemporaryFile"),
             "the chunked receive's file: a SpillFile instead"),
    Internal("spill", f"{_MSG}.create_file_meta", attribute(f"{_MSG}:create_file_meta"),
             "its file meta: three strings, encoded only if the data set spills"),
    Internal("spill", f"{_MSG}.write_file_meta_info",
             method(f"{_MSG}:write_file_meta_info", "fp", "file_meta"),
             "writing the meta: the SpillFile starts its data set instead"),
    Internal("spill", f"{_MSG}:DIMSEMessage._data_set_file",
             source_has(f"{_MSG}:DIMSEMessage.__init__", "self._data_set_file"),
             "the file of a data set cut off mid-transfer, discarded"),
    # contexts: presentation contexts without re-validation
    Internal("contexts", "pynetdicom.presentation:PresentationContext._abstract_syntax/"
             "_transfer_syntax",
             assigned("pynetdicom.presentation:PresentationContext", "_abstract_syntax",
                      "_transfer_syntax"),
             "set directly from UIDs pynetdicom already validated (~0.17 ms per UID saved)"),
    # budget: the connection budget's server (server.py says what each is for)
    Internal("budget", "pynetdicom.ae:ApplicationEntity.make_server(server_class, **kwargs)",
             lambda: {"server_class", "kwargs"} <= set(inspect.signature(
                 _resolve("pynetdicom.ae:ApplicationEntity.make_server")).parameters),
             "builds the BudgetedServer with its own arguments"),
    Internal("budget", "pynetdicom.transport:RequestHandler.handle fires EVT_CONN_OPEN",
             source_has("pynetdicom.transport:RequestHandler.handle", "EVT_CONN_OPEN"),
             "the accepted socket is known before assoc.start()"),
    Internal("budget", "pynetdicom.transport:AssociationSocket.recv/close",
             lambda: callable(getattr(_resolve("pynetdicom.transport:AssociationSocket"),
                                      "recv", None))
             and callable(getattr(_resolve("pynetdicom.transport:AssociationSocket"),
                                  "close", None)),
             "wrapped per connection while it negotiates"),
    Internal("budget", f"{_DUL}._read_pdu_data reads recv(6)",
             source_has(f"{_DUL}._read_pdu_data", "recv(6)"),
             "the first PDU header is judged before its body is read"),
    Internal("budget", f"{_DUL}.to_user_queue", assigned(_DUL, "to_user_queue"),
             "a None there ends the acceptor's wait for the request"),
    Internal("budget", f"{_A}.run_reactor waits acse_timeout, honours a reject in "
             "EVT_REQUESTED",
             source_has(f"{_A}.run_reactor", "receive_pdu(wait=True, timeout=self.acse_timeout)",
                        "EVT_REQUESTED", "is_rejected"),
             "the negotiation deadline and the association limit"),
    Internal("budget", "pynetdicom.acse:ACSE.send_reject",
             method("pynetdicom.acse:ACSE.send_reject", "result", "source", "diagnostic"),
             "a request past max_associations is rejected (local limit exceeded)"),
    Internal("budget", "pynetdicom.transport:ThreadedAssociationServer.get_request/"
             "process_request",
             lambda: all(callable(getattr(_resolve(
                 "pynetdicom.transport:ThreadedAssociationServer"), name, None))
                 for name in ("get_request", "process_request")),
             "the server accepts in its own loop and hands a connection over"),
    Internal("budget", "pynetdicom.acse:ACSE._negotiate_as_acceptor counts maximum_associations",
             source_has("pynetdicom.acse:ACSE._negotiate_as_acceptor", "maximum_associations"),
             "set out of reach: the limit is applied to negotiated associations instead"),
    # reactor: both loops of an association event-driven (reactor.py says what each is for)
    Internal("reactor", f"{_DUL}.run_reactor polls every _run_loop_delay",
             source_has(f"{_DUL}.run_reactor", "time.sleep(self._run_loop_delay)",
                        "_dul_ready", "artim_timer.expired", '"Evt18"',
                        "_process_recv_primitive()", "_is_transport_event()",
                        "_idle_timer.restart()", "event_queue.get(block=False)",
                        "state_machine.do_action(event)"),
             "replaced by the same loop that waits in select instead of sleeping"),
    Internal("reactor", f"{_DUL} queues and timers",
             assigned(_DUL, "to_provider_queue", "to_user_queue", "event_queue", "artim_timer",
                      "_idle_timer", "state_machine", "_kill_thread"),
             "what the loop reads; the queues wake their reader on put"),
    Internal("reactor", f"{_DUL} queues are queue.Queue",
             source_has(f"{_DUL}.__init__", "queue.Queue()"),
             "a queue.Queue can become a WakingQueue in place"),
    Internal("reactor", f"{_DUL}.stop_dul/kill_dul",
             lambda: source_has(f"{_DUL}.stop_dul", '"Sta1"', "self._kill_thread = True")()
             and source_has(f"{_DUL}.kill_dul", "self._kill_thread = True")(),
             "wrapped per DUL to wake it"),
    Internal("reactor", f"{_A}._run_reactor polls every 1 ms",
             source_has(f"{_A}._run_reactor", "time.sleep(0.001)", "_reactor_checkpoint.wait()",
                        "dimse.get_msg(block=False)", "_serve_request(msg",
                        "is_release_requested()", "send_release(is_response=True)",
                        "acse.is_aborted()", "receive_pdu(wait=False)", "dul.is_alive()",
                        "idle_timer_expired()", "network_timeout_response"),
             "replaced by the same loop that waits on its queues"),
    Internal("reactor", f"{_A} reactor state",
             assigned(_A, "_kill", "_is_paused", "_reactor_checkpoint", "dimse", "dul"),
             "what the loop reads and sets"),
    Internal("reactor", f"{_A}.kill sets _kill",
             source_has(f"{_A}.kill", "self._kill = True"), "wrapped per association to wake it"),
    Internal("reactor", f"{_D}.msg_queue is a queue.Queue",
             source_has(f"{_D}.__init__", "self.msg_queue", "queue.Queue()"),
             "decoded requests wake the association's loop"),
)


def _response_with(**fields: int) -> Any:
    """A C_STORE primitive with only ``fields`` set (what the direct reader builds)."""
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    for name, value in fields.items():
        setattr(rsp, name, value)
    return rsp


def _ok(internal: Internal) -> bool:
    try:
        return bool(internal.check())
    except (AttributeError, ImportError, TypeError, ValueError):
        return False


_lock = threading.Lock()
_missing: dict[str, tuple[str, ...]] | None = None  # group → what is missing; None: unchecked


def verify() -> dict[str, tuple[str, ...]]:
    """Check every internal now; returns (and keeps, for :func:`usable`) what is missing,
    by group (a group with nothing missing is left out)."""
    global _missing
    found: dict[str, list[str]] = {}
    for internal in INTERNALS:
        if not _ok(internal):
            found.setdefault(internal.group, []).append(internal.where)
    result = {group: tuple(names) for group, names in found.items()}
    with _lock:
        _missing = result
    return result


def missing(group: str) -> tuple[str, ...]:
    """What ``group`` lacks (as of the last :func:`verify`; verified now if never)."""
    checked = _missing if _missing is not None else verify()
    return checked.get(group, ())


def usable(group: str) -> bool:
    """Whether the fast path of ``group`` may be used."""
    return not missing(group)
