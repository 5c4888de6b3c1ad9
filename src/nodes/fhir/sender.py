"""The FHIR lane's sink: one ImagingStudy per study, kept current by conditional update.

Port ``in`` receives :class:`~nodes.delivery.Delivery` items (one per stored instance). The
node holds them, grouped by ``envelope.study_instance_uid``; when a study has been quiet for
``quiet_time_s`` (or ``max_wait_s`` after its oldest held instance) it asks ``members`` for
every instance of the study the Store holds, maps their headers with
:class:`~nodes.fhir.imagingstudy.ImagingStudyHandler`, reads the server's current resource
(``GET {url}/ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``), merges the two
(:func:`~nodes.fhir.merge.merge_study`) and sends
``PUT {url}/ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>`` (``application/fhir+json``).
Every held delivery of the study is then settled with the outcome of that exchange.

Guarantees:

- Each delivery is settled exactly once; the outcome of a delivered one carries
  ``"handler imaging-study 1.0; HTTP 201"`` as detail (the audit trail's handler version; no
  derived delivery is made because the resource stands for the whole study, not one object).
- The resource always lists every instance the Store holds for the study (plus the held ones,
  should ``members`` miss them) and every instance the server's resource listed, so an update
  never drops what the Store has purged since the last one; updates of one study are sent one
  at a time, in arrival order; different studies go concurrently, up to ``max_connections``.
  (Another writer changing the resource between our GET and PUT is not detected.)
- A search that fails settles like the PUT would (5xx/408/429/transport transient, other
  answers permanent, reasons prefixed ``search:``); more than one match is Permanent
  ``"ambiguous: N ImagingStudy resources match"``.
- A held instance whose header cannot be parsed is settled Permanent on its own and left out;
  a study that cannot be mapped (no Patient ID, no Modality…) settles Permanent; reasons and
  log fields are routing-safe (UIDs, status codes, OperationOutcome issue codes, classes).
- ``ctx.check_http`` runs before every request (the GET and the PUT); a dropped kept-alive
  connection is retried once at once, nothing else is retried here (the Store owns retries).
- End of input sends every held study at once (nothing more can arrive).

Cancellation: held deliveries stay unsettled and the Store re-queues them. A crash hands them
back as Transient (the supervisor's abandon).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
from pydicom.errors import InvalidDicomError

from flow import Context, get_logger, register_safe_fields

from ..arrival import Envelope
from ..delivery import Delivery
from ..dicom.header import read_header
from ..http import HttpClientConfig
from ..outcome import Outcome, Permanent, Transient, kind_of
from ..payload import Payload
from ..sender import HttpSender, elapsed_ms
from .aggregate import StudyAggregator
from .imagingstudy import DICOM_UID_SYSTEM, ImagingStudyHandler, MappingError
from .merge import merge_study
from .response import SearchError, classify_fhir, search_match

if TYPE_CHECKING:  # imported where a request is made (nodes.http): not every process sends
    import httpx

log = get_logger("nodes.fhir")
register_safe_fields("study_instance_uid", "series", "held", "unreadable", "pending_studies",
                     "delivered", "transient", "permanent", "search_status", "server_only")

FHIR_JSON = "application/fhir+json"
MAX_RESPONSE_BYTES = 1 << 20  # an OperationOutcome is small; a representation we ignore
# The search answer holds the whole resource: ~150 bytes per instance, so this is ~200k
# instances, far beyond any study; a bigger answer is not one we would merge.
MAX_SEARCH_BYTES = 32 << 20

Members = Callable[[str], Awaitable[Sequence[tuple[Envelope, Payload]]]]


class FhirConfig(HttpClientConfig):
    """The ``[fhir]`` site-config table: one FHIR R4 server.

    Besides :class:`~nodes.http.HttpClientConfig`'s keys (url — the FHIR base, e.g.
    ``https://ehr.example/fhir`` —, timeout_ms, max_connections, tls_ca,
    auth_header_file / auth_header_env / auth_header_name):

    Attributes:
        patient_identifier_system: system URI of the site's Patient IDs (subject.identifier).
        quiet_time_s: a study is sent this long after its latest instance arrived.
        max_wait_s: ... or this long after its oldest unsent instance arrived.
        endpoint: Reference put in ImagingStudy.endpoint (e.g. ``Endpoint/pacs-wado``).
        timezone: IANA zone for ``started`` of objects without TimezoneOffsetFromUTC.
    """

    patient_identifier_system: str | None = None
    quiet_time_s: float = 10.0
    max_wait_s: float = 300.0
    endpoint: str | None = None
    timezone: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.quiet_time_s <= 86_400:
            raise ValueError("quiet_time_s must be between 0 and 86400")
        if not 0 < self.max_wait_s <= 86_400:
            raise ValueError("max_wait_s must be positive and at most 86400")
        ImagingStudyHandler(timezone=self.timezone)  # ValueError names an unknown zone

    @property
    def imaging_study_url(self) -> str:
        return self.url.rstrip("/") + "/ImagingStudy"


def study_query(study_uid: str) -> dict[str, str]:
    """The conditional-update search: ``identifier=urn:dicom:uid|urn:oid:<uid>``."""
    return {"identifier": f"{DICOM_UID_SYSTEM}|urn:oid:{study_uid}"}


class _Built:
    """What the worker thread made of a study's instances."""

    def __init__(self) -> None:
        self.resource: dict[str, Any] | None = None
        self.error: str | None = None          # MappingError text: routing-safe
        self.unreadable: dict[str, str] = {}   # SOP Instance UID → error class
        self.foreign: set[str] = set()         # SOP Instance UIDs whose header names another study
        self.series = 0
        self.instances = 0


def build_resource(handler: ImagingStudyHandler, study_uid: str,
                   items: Sequence[tuple[str, Payload]]) -> _Built:
    """Blocking: read the headers of ``(uid, payload)`` items and map them (one thread hop).

    Unparseable objects are listed in ``unreadable``, objects whose header names another study
    (an envelope that disagrees with its object) in ``foreign``; neither is mapped.
    An OSError (the Store could not read its own file) propagates: that is transient.
    """
    built = _Built()
    datasets = []
    for uid, payload in items:
        try:
            ds = read_header(payload)
        except OSError:
            raise
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, IndexError,
                NotImplementedError, OverflowError) as exc:
            built.unreadable[uid] = type(exc).__name__
            continue
        if str(ds.get("StudyInstanceUID", "")).strip(" \0") == study_uid:
            datasets.append(ds)
        else:
            built.foreign.add(uid)
    if not datasets:
        built.error = f"no readable instance of study {study_uid}"
        return built
    try:
        resource = handler.handle(datasets)
    except MappingError as exc:
        built.error = str(exc)
        return built
    built.series, built.instances = resource["numberOfSeries"], resource["numberOfInstances"]
    built.resource = resource
    return built


class _Merged:
    def __init__(self, body: bytes, resource: dict[str, Any], fresh: dict[str, Any]) -> None:
        self.body = body
        self.series = resource["numberOfSeries"]
        self.instances = resource["numberOfInstances"]
        self.server_only = self.instances - fresh["numberOfInstances"]


def merged_body(search_answer: bytes, fresh: dict[str, Any]) -> _Merged:
    """Blocking (a big study's JSON): the PUT body from the search answer and our mapping.

    Raises :class:`~nodes.fhir.response.SearchError` when the answer names no single resource.
    """
    resource = merge_study(search_match(search_answer), fresh)
    body = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
    return _Merged(body, resource, fresh)


class FhirStudySender(HttpSender):
    """Sink: keeps one FHIR ImagingStudy per study current; settles every delivery.

    Args:
        config: the ``[fhir]`` table.
        members: ``async members(study_uid) -> [(Envelope, Payload), ...]``, every instance of
            the study the Store holds (``Store.study_members``).
        handler: the mapping (default: :class:`ImagingStudyHandler` from the config).
        client: an httpx client to use instead of building one (tests; caller closes it).
    """

    config: FhirConfig
    counters = ("studies_sent", "delivered", "transient", "permanent", "skipped",
                "pending_studies", "held")
    log = log
    reconnect_event = "fhir.reconnect"

    def __init__(self, config: FhirConfig, members: Members, *, name: str = "fhir_sender",
                 handler: ImagingStudyHandler | None = None,
                 client: httpx.AsyncClient | None = None, capacity: int | None = None) -> None:
        super().__init__(config, name=name, capacity=capacity, client=client)
        self.members = members
        self.handler = handler or ImagingStudyHandler(
            config.patient_identifier_system, config.endpoint, timezone=config.timezone)

    async def probe(self, ctx: Context) -> dict[str, Any]:
        """``GET {url}/metadata`` (the CapabilityStatement): reachable, authorised."""
        return await self.probe_get(ctx, self.config.url.rstrip("/") + "/metadata",
                                    headers={"Accept": FHIR_JSON})

    # -- behaviour -----------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        async with self.lane_client() as client:
            stats = self.lane_stats(ctx.lane)
            agg: StudyAggregator[Delivery] = StudyAggregator(self.config.quiet_time_s,
                                                             self.config.max_wait_s)
            state = _State()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._schedule, ctx, client, agg, state, stats)
                while True:
                    try:
                        delivery: Delivery = await ctx.receive_one()
                    except trio.EndOfChannel:
                        break
                    study = delivery.envelope.study_instance_uid
                    if not study:
                        await self.settle(ctx, delivery, Permanent(
                            "no StudyInstanceUID in the envelope"), stats)
                        continue
                    agg.add(study, delivery, trio.current_time())
                    self._figures(agg, stats)
                    state.wake()
                state.closed = True
                state.wake()

    async def _schedule(self, ctx: Context, client: httpx.AsyncClient,
                        agg: StudyAggregator[Delivery], state: "_State",
                        stats: dict[str, int]) -> None:
        slots = trio.Semaphore(self.config.max_connections)
        async with trio.open_nursery() as sends:
            while True:
                changed = state.reset()
                study = agg.next_due(trio.current_time(), flush=state.closed)
                if study is not None:
                    await slots.acquire()
                    deliveries = agg.take(study)
                    self._figures(agg, stats)
                    sends.start_soon(self._flush, ctx, client, agg, state, slots, study,
                                     deliveries, stats)
                    continue
                if state.closed and agg.idle:
                    return
                deadline = math.inf if state.closed else agg.next_deadline()
                with trio.move_on_at(deadline):
                    await changed.wait()

    async def _flush(self, ctx: Context, client: httpx.AsyncClient,
                     agg: StudyAggregator[Delivery], state: "_State", slots: trio.Semaphore,
                     study: str, deliveries: list[Delivery], stats: dict[str, int]) -> None:
        try:
            outcomes, info = await self._send_study(ctx, client, study, deliveries)
        finally:
            agg.done(study)
            slots.release()
            state.wake()
        stats["studies_sent"] += 1
        counts = {"delivered": 0, "transient": 0, "permanent": 0}
        for outcome, group in outcomes:
            await self.settle_together(ctx, ((d, outcome) for d in group), stats)
            kind = kind_of(outcome)
            if kind in counts:
                counts[kind] += len(group)
        level = log.info if not counts["transient"] + counts["permanent"] else log.warning
        level("fhir.study", lane=ctx.lane, study_instance_uid=study, held=len(deliveries),
              **info, **counts)

    async def _send_study(self, ctx: Context, client: httpx.AsyncClient, study: str,
                          deliveries: list[Delivery]
                          ) -> tuple[list[tuple[Outcome, list[Delivery]]], dict[str, Any]]:
        """Map, merge with the server's resource, PUT; (outcome per group of held deliveries,
        log fields)."""
        info: dict[str, Any] = {}
        try:
            members = await self.members(study)
        except Exception as exc:  # noqa: BLE001 - the Store's problem is this study's retry
            info["error_class"] = type(exc).__name__
            return [(Transient(f"store members lookup failed: {type(exc).__name__}"),
                     deliveries)], info
        items: dict[str, Payload] = {env.sop_instance_uid: p for env, p in members}
        for d in deliveries:
            items.setdefault(d.uid, d.payload)
        try:
            built = await trio.to_thread.run_sync(
                build_resource, self.handler, study, sorted(items.items()))
        except OSError as exc:
            info["error_class"] = type(exc).__name__
            return [(Transient(f"store read failed: {type(exc).__name__}"), deliveries)], info
        groups: list[tuple[Outcome, list[Delivery]]] = []
        good = []
        for d in deliveries:
            if d.uid in built.unreadable:
                groups.append((Permanent(f"unreadable DICOM header: {built.unreadable[d.uid]}"),
                               [d]))
            elif d.uid in built.foreign:
                groups.append((Permanent("header StudyInstanceUID differs from the envelope's"),
                               [d]))
            else:
                good.append(d)
        info.update(series=built.series, instances=built.instances,
                    unreadable=len(built.unreadable))
        if not good:
            return groups, info
        if built.resource is None:
            return groups + [(Permanent(f"mapping: {built.error}"), good)], info
        started = time.monotonic()
        outcome = await self._update(ctx, client, study, built.resource, info)
        info["ms"] = elapsed_ms(started)
        return groups + [(outcome, good)], info

    async def _update(self, ctx: Context, client: httpx.AsyncClient, study: str,
                      fresh: dict[str, Any], info: dict[str, Any]) -> Outcome:
        """Read the server's resource, merge ours over it, PUT the result."""
        got = await self._request(ctx, client, "GET", study, headers={"Accept": FHIR_JSON},
                                  limit=MAX_SEARCH_BYTES)
        if isinstance(got, Transient):
            return Transient(f"search: {got.reason}", got.retry_after)
        status, retry_after, answer = got
        info["search_status"] = status
        if not 200 <= status < 300:
            failed = classify_fhir(status, answer, retry_after)
            if isinstance(failed, Transient):
                return Transient(f"search: {failed.reason}", failed.retry_after)
            assert isinstance(failed, Permanent)  # classify_fhir: only 2xx is Delivered
            return Permanent(f"search: {failed.reason}")
        if answer is None:
            return Permanent(f"search: HTTP {status}: answer larger than {MAX_SEARCH_BYTES} "
                             "bytes")
        try:
            merged = await trio.to_thread.run_sync(merged_body, answer, fresh)
        except SearchError as exc:
            return Permanent(str(exc))
        info.update(series=merged.series, instances=merged.instances,
                    server_only=merged.server_only)
        got = await self._request(ctx, client, "PUT", study, content=merged.body, headers={
            "Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Prefer": "return=minimal"},
            limit=MAX_RESPONSE_BYTES)
        if isinstance(got, Transient):
            return got
        status, retry_after, answer = got
        info["http_status"] = status
        detail = f"handler {self.handler.name} {self.handler.version}; HTTP {status}"
        return classify_fhir(status, answer, retry_after, detail=detail)

    async def _request(self, ctx: Context, client: httpx.AsyncClient, method: str, study: str,
                       *, headers: dict[str, str], limit: int, content: bytes | None = None
                       ) -> tuple[int, str | None, bytes | None] | Transient:
        """One exchange at ``{url}/ImagingStudy?identifier=…``: (status, Retry-After, body
        or None when larger than ``limit``), or the Transient of a request left unanswered."""
        got = await self.exchange(ctx, client, method, self.config.imaging_study_url,
                                  lambda: (headers, content), limit=limit,
                                  params=study_query(study))
        if isinstance(got, Transient):
            return got
        response, answer = got
        return response.status_code, response.headers.get("Retry-After"), answer

    @staticmethod
    def _figures(agg: StudyAggregator[Delivery], stats: dict[str, int]) -> None:
        stats["pending_studies"] = agg.pending_studies
        stats["held"] = agg.pending_items


class _State:
    """Wake-ups for the scheduler: new instance, a send finished, end of input."""

    def __init__(self) -> None:
        self.closed = False
        self._changed = trio.Event()

    def reset(self) -> trio.Event:
        self._changed = trio.Event()
        return self._changed

    def wake(self) -> None:
        self._changed.set()
