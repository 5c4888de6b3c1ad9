"""Filters and header transforms inside a lane: routing by header, pixel bytes untouched."""

import io
import tracemalloc

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from flow import Graph, Node, run
from nodes.arrival import Envelope
from nodes.delivery import Recorder
from nodes.outcome import Delivered, Permanent, Skipped
from nodes.payload import BytesPayload, FilePayload, read_all
from nodes.route import (Filter, SetElements, Transform, envelope_predicate,
                         is_structured_report)
from support.synth import CANARY, ct, sr_report, to_part10
from support.flownodes import Feed


def envelope(ds):
    meta = getattr(ds, "file_meta", None)
    return Envelope(ds.SOPInstanceUID, ds.SOPClassUID,
                    meta.TransferSyntaxUID if meta else "1.2.840.10008.1.2.1")


class Deliver(Node):
    """The lane's end: keeps what reached it and settles it delivered."""

    outputs = ()

    def __init__(self, **kw):
        super().__init__(**kw)
        self.got = []

    async def run(self, ctx):
        async for d in ctx.receive():
            self.got.append(d)
            await d.settle(Delivered())


async def through(node, *datasets_or_payloads):
    rec = Recorder()
    deliveries = []
    for item in datasets_or_payloads:
        if isinstance(item, tuple):
            env, payload = item
        else:
            payload = BytesPayload(to_part10(item))
            env = envelope(item)
        deliveries.append(rec.delivery(env, payload))
    sink = Deliver()
    await run(Graph(Feed(deliveries) >> node >> sink))
    return rec, sink.got


async def test_filter_passes_reports_and_skips_images():
    report, image = sr_report(), ct()
    rec, got = await through(Filter(is_structured_report), report, image)
    assert [d.uid for d in got] == [report.SOPInstanceUID]
    assert rec.outcomes[report.SOPInstanceUID] == Delivered()
    assert rec.outcomes[image.SOPInstanceUID] == Skipped("filter filter_is_structured_report")


class Unreadable:
    """A payload that must not be opened."""

    size = 0

    def open(self):
        raise AssertionError("an envelope predicate read the stored bytes")


async def test_envelope_predicate_routes_without_reading_the_object():
    report, image = sr_report(), ct()
    rec, got = await through(Filter(is_structured_report), (envelope(report), Unreadable()),
                             (envelope(image), Unreadable()))
    assert [d.uid for d in got] == [report.SOPInstanceUID]
    assert rec.outcomes[image.SOPInstanceUID] == Skipped("filter filter_is_structured_report")

    @envelope_predicate
    def from_ct(env):
        return env.modality == "CT"

    ct_env = Envelope("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                      modality="CT")
    rec, got = await through(Filter(from_ct), (ct_env, Unreadable()))
    assert [d.uid for d in got] == ["1.2.3.4"]


def test_is_structured_report_reads_a_header_or_an_envelope():
    report, image = sr_report(), ct()
    assert is_structured_report(report) and not is_structured_report(image)
    assert is_structured_report(envelope(report)) and not is_structured_report(envelope(image))


async def test_unparseable_header_or_raising_predicate_is_permanent_without_phi():
    def explode(ds):
        raise KeyError(str(ds.PatientName))

    image = ct()
    garbage = (Envelope("1.2.3", "1.2.840.10008.5.1.4.1.1.2", ""), BytesPayload(b"not dicom"))
    rec, got = await through(Filter(explode), image, garbage)
    assert got == []
    assert rec.outcomes[image.SOPInstanceUID] == Permanent("filter filter_explode: KeyError")
    assert isinstance(rec.outcomes["1.2.3"], Permanent)
    assert CANARY not in repr(rec.outcomes)


def pixel_offset(data: bytes) -> int:
    f = io.BytesIO(data)
    dcmread(f, stop_before_pixels=True)
    return f.tell()


async def test_transform_edits_header_only_and_keeps_pixel_bytes_identical():
    original = ct(rows=128, cols=128)
    original.StationName = "CT01"
    data = to_part10(original)
    transform = SetElements(InstitutionName="Site A Imaging", prefix={"StationName": "EXT-"})
    rec, got = await through(Transform(transform), (envelope(original), BytesPayload(data)))
    [delivery] = got
    out = read_all(delivery.payload)
    assert out[pixel_offset(out):] == data[pixel_offset(data):]
    edited = dcmread(io.BytesIO(out))
    assert edited.InstitutionName == "Site A Imaging" and edited.StationName == "EXT-CT01"
    before = dcmread(io.BytesIO(data))
    for elem in before:
        if elem.keyword not in ("InstitutionName", "StationName"):
            assert edited[elem.tag].value == elem.value, elem.keyword
    assert edited.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert rec.notes[original.SOPInstanceUID] == ("transform set-elements 1",)


async def test_transform_of_a_deflated_object_reencodes_it_whole():
    original = ct()
    data = to_part10(original, DeflatedExplicitVRLittleEndian)
    rec, got = await through(Transform(SetElements(InstitutionName="X")),
                             (envelope(original), BytesPayload(data)))
    edited = dcmread(io.BytesIO(read_all(got[0].payload)))
    assert edited.InstitutionName == "X" and edited.PixelData == original.PixelData
    assert edited.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


async def test_transform_streams_a_large_object_without_loading_it(tmp_path):
    big = ct(rows=2048, cols=2048)  # 8 MiB of pixel data
    path = tmp_path / "big.dcm"
    path.write_bytes(to_part10(big))
    del big
    tracemalloc.start()
    try:
        rec, got = await through(Transform(SetElements(InstitutionName="Y")),
                                 (Envelope("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", ""),
                                  FilePayload(path)))
        payload = got[0].payload
        total = 0
        with payload.open() as f:
            while chunk := f.read(1 << 16):
                total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == payload.size
    assert peak < 4 << 20  # well under the 8 MiB object


def test_set_elements_refuses_pixel_data_and_unknown_keywords():
    with pytest.raises(ValueError):
        SetElements(PixelData="x")
    with pytest.raises(ValueError):
        SetElements(InstitutionNmae="x")
