"""SR → ORU^R01 messages/s for a 50-item SR, and MLLP round trips/s, each with a same-run
baseline. Prints ONE JSON line.

    .venv/bin/python bench/hl7.py [--seconds 2] [--repeat 3]

SR → ORU (one core, this process): ``SRReportHandler.handle(ds).encode()`` on an in-memory
50-content-item Comprehensive SR (``sr_to_oru_per_s``; target ≥ 2,000 by CPU time,
``target_met``), and the whole per-delivery work of ToHL7 from the Part 10 bytes of that
SR (``sr_to_oru_from_part10_per_s``): ``nodes.hl7.node.map_delivery`` itself on a delivery
of a BytesPayload — the lane's header reader (nodes/dicom/header.py), the handler reading
the content tree from its bytes (nodes/dicom/items.py), encode (a stored object adds the
file read). ``sr_to_oru_from_part10_dcmread_per_s``: the same with pydicom's
``dcmread`` reading the header (``nodes.dicom.dcmread_header``, what the lane used before
round 3). Baseline: hl7apy building the same message, segment by
segment from field texts rendered before the clock starts, and serializing it to ER7
(``baseline_hl7apy_build_per_s``): the builder we chose not to use, given less work than ours
(no DICOM mapping, no escaping). Rates are best-of-``repeat`` by CPU time of this process
(``*_per_cpu_s``) and by wall time, each the best 0.2 s window of the run (see ``rate``):
the machine is shared, CPU time is the steadier figure;
``calibration_sum_range_ms`` says how fast this machine ran pure Python during the run.

MLLP: ``MllpSender.send`` of that ORU to an MLLP listener (tests/support/ris.py) running in
its own process on 127.0.0.1, one connection, one message in flight
(``mllp_round_trips_per_s``). Baseline: a plain blocking socket sending the same frame and
reading the ACK from the same listener (``baseline_raw_socket_round_trips_per_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "nodes" / "hl7")]

import trio  # noqa: E402
from hl7apy.consts import VALIDATION_LEVEL  # noqa: E402
from hl7apy.core import Message as ApyMessage  # noqa: E402
from hl7apy.core import Segment as ApySegment  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

import hl7_samples as samples  # noqa: E402
from nodes.arrival import Envelope  # noqa: E402
from nodes.delivery import Recorder  # noqa: E402
from nodes.dicom.header import dcmread_header as read_header  # noqa: E402
from nodes.hl7 import MllpSender, RisConfig, SRReportHandler, frame  # noqa: E402
from nodes.hl7.model import field_er7  # noqa: E402
from nodes.hl7.node import map_delivery  # noqa: E402
from nodes.outcome import Delivered  # noqa: E402
from nodes.payload import BytesPayload  # noqa: E402
from support.peers import Process, free_port, wait_for_port  # noqa: E402
from support.synth import to_part10  # noqa: E402


WINDOW_S = 0.2  # the rates are the best over windows this long


def rate(fn, seconds: float, repeat: int) -> tuple[float, float]:
    """(best calls per CPU second, best calls per wall second) over ``repeat`` runs of
    ``seconds``, each timed in windows of WINDOW_S: the neighbours of this shared machine
    only ever slow it down, in bursts of a few seconds, and the best short window is the
    closest figure to what the code costs on a core of its own."""
    for _ in range(20):
        fn()
    best_cpu = best_wall = 0.0
    for _ in range(repeat * max(1, round(seconds / WINDOW_S))):
        n = 0
        wall, cpu = time.perf_counter(), time.process_time()
        deadline = wall + WINDOW_S
        while time.perf_counter() < deadline:
            for _ in range(10):
                fn()
            n += 10
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best_cpu = max(best_cpu, n / cpu if cpu else 0.0)
        best_wall = max(best_wall, n / wall)
    return round(best_cpu), round(best_wall)


def apy_builder(message):
    """hl7apy building ``message`` (our model) from field texts rendered up front."""
    plan = []
    for seg in message.segments[1:]:
        fields = [(f"{seg.name.lower()}_{i}", field_er7(v))
                  for i, v in enumerate(seg.fields, start=1) if v not in (None, "")]
        plan.append((seg.name, fields))
    msh = message.msh

    def build() -> str:
        m = ApyMessage("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
        m.msh.msh_3 = msh.get(3)
        m.msh.msh_4 = msh.get(4)
        m.msh.msh_5 = msh.get(5)
        m.msh.msh_6 = msh.get(6)
        m.msh.msh_7 = msh.get(7)
        m.msh.msh_9 = "ORU^R01^ORU_R01"
        m.msh.msh_10 = msh.get(10)
        m.msh.msh_11 = "P"
        for name, fields in plan:
            seg = ApySegment(name, version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
            for attr, text in fields:
                setattr(seg, attr, text)
            m.add(seg)
        return m.to_er7()

    return build


TARGET = 2000  # SR → ORU messages per CPU second (issue 7)


def sr_figures(seconds: float, repeat: int) -> dict:
    handler = SRReportHandler(samples.RIS)
    ds = samples.fifty_items()
    message = handler.handle(ds)
    data = message.encode()
    payload = BytesPayload(to_part10(ds))
    envelope = Envelope(ds.SOPInstanceUID, ds.SOPClassUID, ExplicitVRLittleEndian)
    lane_delivery = Recorder().delivery(envelope, payload, "ris")
    # the same ORU as in memory (after MSH, whose time and control ID differ per call)
    assert map_delivery(handler, lane_delivery).split(b"\r", 1)[1] == data.split(b"\r", 1)[1]
    ours_cpu, ours_wall = rate(lambda: handler.handle(ds).encode(), seconds, repeat)
    p10_cpu, p10_wall = rate(lambda: map_delivery(handler, lane_delivery), seconds, repeat)
    dcm_cpu, dcm_wall = rate(lambda: handler.handle(read_header(payload)).encode(), seconds,
                             repeat)
    build = apy_builder(message)
    assert build().count("\rOBX|") == len(message.all("OBX"))
    apy_cpu, apy_wall = rate(build, seconds, max(1, repeat - 1))
    return {
        "sr_content_items": sum(1 for o in message.all("OBX") if o.get(4)),
        "oru_segments": len(message), "oru_bytes": len(data),
        "sr_to_oru_per_cpu_s": ours_cpu, "sr_to_oru_per_s": ours_wall,
        "sr_to_oru_from_part10_per_cpu_s": p10_cpu, "sr_to_oru_from_part10_per_s": p10_wall,
        "sr_to_oru_from_part10_dcmread_per_cpu_s": dcm_cpu,
        "sr_to_oru_from_part10_dcmread_per_s": dcm_wall,
        "baseline_hl7apy_build_per_cpu_s": apy_cpu, "baseline_hl7apy_build_per_s": apy_wall,
        "target_sr_to_oru_per_s": TARGET,
        "target_met": ours_cpu >= TARGET,
    }


class _Ctx:
    lane = "bench"

    def check_tcp(self, host: str, port: int) -> None:
        pass  # the bench's own listener on 127.0.0.1


async def mllp_rate(port: int, data: bytes, seconds: float) -> float:
    sender = MllpSender(RisConfig(host="127.0.0.1", port=port))
    ctx = _Ctx()
    assert await sender.send(ctx, data) == Delivered()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        outcome = await sender.send(ctx, data)
        assert outcome == Delivered(), outcome
        n += 1
    elapsed = time.perf_counter() - start
    await sender.close()
    return n / elapsed


def raw_rate(port: int, data: bytes, seconds: float) -> float:
    block = frame(data)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            sock.sendall(block)
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("listener closed the connection")
                answer += chunk
            n += 1
        return n / (time.perf_counter() - start)


def mllp_figures(seconds: float, repeat: int) -> dict:
    data = SRReportHandler(samples.RIS).handle(samples.fifty_items()).encode()
    port = free_port()
    with TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(ROOT / "tests")])}
        with Process([sys.executable, "-m", "support.ris", str(port)], env=env,
                     log=Path(tmp) / "ris.log"):
            wait_for_port(port)
            ours, raw = [], []
            for _ in range(repeat):  # interleaved: both see the same machine
                ours.append(trio.run(mllp_rate, port, data, seconds))
                raw.append(raw_rate(port, data, seconds))
    return {"mllp_round_trips_per_s": round(max(ours)),
            "baseline_raw_socket_round_trips_per_s": round(max(raw)),
            "mllp_message_bytes": len(data)}


def calibration_ms() -> float:
    """This machine's pure-Python speed now: best of 5 ``sum(range(10**6))`` in ms (a current
    desktop core: ~12 ms). Lets a reader scale the rates to another machine."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        sum(range(10**6))
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    result = {"bench": "hl7", **sr_figures(args.seconds, args.repeat),
              **mllp_figures(args.seconds, args.repeat),
              "calibration_sum_range_ms": calibration_ms(),
              "load_average_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
