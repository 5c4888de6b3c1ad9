"""Quiet-time aggregation of the FHIR sender, on Trio's virtual clock (autojump_clock):
the HTTP server is an in-process httpx MockTransport, so no real time passes.

A send starts with the Store lookup (``FakeStore.calls`` records its virtual time); later
stamps are only lower bounds, because the clock may jump while headers are read in a thread.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import trio

from nodes.delivery import Recorder
from nodes.fhir import FhirConfig
from nodes.outcome import Delivered

sys.path.insert(0, os.path.dirname(__file__))
from fhir_harness import FakeStore, mock_client, run_sender, stored, uids_in  # noqa: E402
from fhir_studies import STUDY, ct_instance, sr_instance  # noqa: E402

URL = "http://fhir.test/fhir"


class Server:
    """Records (virtual time, resource) per PUT; optionally takes ``delay`` seconds per PUT.
    A search (GET) answers the latest PUT's resource at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.puts: list[tuple[float, dict]] = []
        self.active = 0
        self.max_active = 0
        self.delay = delay

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            entries = [{"resource": self.puts[-1][1]}] if self.puts else []
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                             "entry": entries})
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.puts.append((trio.current_time(), json.loads(request.content)))
            await trio.sleep(self.delay)
        finally:
            self.active -= 1
        return httpx.Response(201 if len(self.puts) == 1 else 200)


def cfg(**kw) -> FhirConfig:
    return FhirConfig(**{"url": URL, "quiet_time_s": 10.0, **kw})


async def test_two_bursts_within_the_quiet_time_make_one_resource(autojump_clock):
    store, rec, server = FakeStore(), Recorder(), Server()
    start = trio.current_time()
    first = stored(store, rec, [ct_instance(1), ct_instance(2)])
    second = stored(store, rec, [ct_instance(3), sr_instance()])
    async with mock_client(server) as client:
        await run_sender(cfg(), [*first, 3.0, *second, 60.0], store, client=client)
    assert len(server.puts) == 1
    (at, _), = store.calls
    assert 13.0 <= at - start < 14.0  # quiet time counted from the *last* instance
    resource = server.puts[0][1]
    assert len(uids_in(resource)) == 4
    assert len(rec.outcomes) == 4
    assert all(o == Delivered("handler imaging-study 1.0; HTTP 201") for o in rec.outcomes.values())


async def test_bursts_further_apart_update_the_resource_with_everything_held(autojump_clock):
    store, rec, server = FakeStore(), Recorder(), Server()
    first = stored(store, rec, [ct_instance(1)])
    later = [ct_instance(2), sr_instance()]
    steps = [*first, 30.0, lambda: stored(store, rec, later), 60.0]
    async with mock_client(server) as client:
        await run_sender(cfg(), steps, store, client=client)
    assert [len(uids_in(r)) for _, r in server.puts] == [1, 3]
    assert rec.outcomes[f"{STUDY}.1.1"].detail.endswith("HTTP 201")
    assert rec.outcomes[f"{STUDY}.2.1"].detail.endswith("HTTP 200")


async def test_a_study_that_never_goes_quiet_is_sent_after_max_wait(autojump_clock):
    store, rec, server = FakeStore(), Recorder(), Server()
    start = trio.current_time()
    steps = []
    for n in range(1, 12):  # one instance every 5 s for 55 s; quiet time 10 s never passes
        steps += [lambda n=n: stored(store, rec, [ct_instance(n)]), 5.0]
    async with mock_client(server) as client:
        await run_sender(cfg(max_wait_s=30.0), steps + [60.0], store, client=client)
    first_at = store.calls[0][0] - start
    assert 30.0 <= first_at < 35.0
    assert len(uids_in(server.puts[-1][1])) == 11
    assert len(rec.outcomes) == 11


async def test_updates_of_one_study_are_sent_one_at_a_time(autojump_clock):
    store, rec, server = FakeStore(), Recorder(), Server(delay=40.0)  # a slow server
    steps = [*stored(store, rec, [ct_instance(1)]), 15.0,
             lambda: stored(store, rec, [ct_instance(2)]), 100.0]
    async with mock_client(server) as client:
        await run_sender(cfg(max_connections=4), steps, store, client=client)
    assert server.max_active == 1
    (t1, r1), (t2, r2) = server.puts
    assert t2 - t1 >= 40.0  # the second waited for the first to finish
    assert [len(uids_in(r)) for r in (r1, r2)] == [1, 2]


async def test_end_of_input_sends_held_studies_without_waiting(autojump_clock):
    store, rec, server = FakeStore(), Recorder(), Server()
    start = trio.current_time()
    async with mock_client(server) as client:
        await run_sender(cfg(quiet_time_s=3600.0), stored(store, rec, [ct_instance(1)]), store,
                         client=client)
    assert len(server.puts) == 1 and store.calls[0][0] - start < 1.0
