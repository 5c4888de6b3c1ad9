"""Helpers shared by the DIMSE tests, the interop tests and bench/dimse.py.

- :class:`Committer`: a stand-in Store sink that commits (or refuses) receipts in memory;
- :func:`study`: a mixed CT/MR/SR study with compressed (encapsulated) objects whose pixel
  fragments are arbitrary bytes: nothing ever decodes them;
- :func:`storescu`, :class:`Storescp`: DCMTK peers started and stopped by pid;
- :data:`SITE_GRAPH`, :func:`write_site`: listener -> Store -> pacs as a graph file and
  site file for a ``flow`` child.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio
from pydicom.encaps import encapsulate
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                         JPEGLosslessSV1, RLELossless, generate_uid)

from flow import EgressConfig, EgressPolicy, Graph, Node, RestartPolicy, Runner
from nodes.arrival import Arrival, Envelope, StoreFailed, StoreFull
from nodes.delivery import Delivery, Recorder
from nodes.dimse import ListenConfig, PacsConfig
from nodes.payload import BytesPayload, FilePayload, read_all
from support.peers import Process, ProcessEnded, free_port, need, wait_for_port
from support.synth import ct, dataset_bytes_after_meta, mr, sr_report, write
from support.flownodes import Feed  # noqa: F401  (the DIMSE tests import it from here)


class Committer(Node):
    """Sink standing in for the Store: reads each arrival's payload, then settles its receipt.

    ``mode``: "commit" (default), "full" (StoreFull), "fail" (StoreFailed), "hang" (never
    answers). With ``gate`` set, each commit waits for the event first.
    """

    outputs = ()

    def __init__(self, mode: str = "commit", gate: trio.Event | None = None, *,
                 digest_only: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.mode = mode
        self.gate = gate
        self.digest_only = digest_only  # keep a SHA-256 of the bytes, read in chunks
        self.arrivals: list[tuple[Arrival, bytes]] = []
        self.seen = trio.Event()

    async def run(self, ctx) -> None:
        async for arrival in ctx.receive():
            data = await trio.to_thread.run_sync(
                _digest if self.digest_only else read_all, arrival.payload)
            self.arrivals.append((arrival, data))
            self.seen.set()
            if self.gate is not None:
                await self.gate.wait()
            if self.mode == "commit":
                arrival.receipt.committed()
            elif self.mode == "full":
                arrival.receipt.failed(StoreFull("map above high-water mark"))
            elif self.mode == "fail":
                arrival.receipt.failed(StoreFailed("write failed"))
            ctx.release()

    def by_uid(self) -> dict[str, bytes]:
        return {a.envelope.sop_instance_uid: data for a, data in self.arrivals}


def _digest(payload) -> bytes:
    import hashlib

    from nodes.payload import CHUNK

    h = hashlib.sha256()
    with payload.open() as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.digest()


def encapsulated(ds, transfer_syntax: str, fragments: Sequence[bytes]):
    """``ds`` with Pixel Data replaced by encapsulated ``fragments`` (never decoded)."""
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate(list(fragments))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def study(directory: Path, *, study_uid: str | None = None) -> dict[str, Path]:
    """A mixed study written to ``directory``: {SOPInstanceUID: path}.

    CT and MR in explicit and implicit VR, an SR, a deflated MR, a JPEG baseline CT, a JPEG
    lossless MR and an RLE CT (arbitrary fragment bytes with the right transfer syntax UID).
    """
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    ct_series, mr_series, sr_series = generate_uid(), generate_uid(), generate_uid()
    items = [
        (ct(study_uid=study_uid, series_uid=ct_series, instance_number=1), ExplicitVRLittleEndian),
        (ct(study_uid=study_uid, series_uid=ct_series, instance_number=2), ImplicitVRLittleEndian),
        (mr(study_uid=study_uid, series_uid=mr_series, instance_number=1), ExplicitVRLittleEndian),
        (sr_report(study_uid=study_uid, series_uid=sr_series), ExplicitVRLittleEndian),
        (mr(study_uid=study_uid, series_uid=mr_series, instance_number=3),
         DeflatedExplicitVRLittleEndian),
        (encapsulated(ct(study_uid=study_uid, series_uid=ct_series, instance_number=3),
                      JPEGBaseline8Bit, [b"\xff\xd8JPEG-FAKE-1\xff\xd9", b"\xff\xd8JPEG-2\xff\xd9"]),
         JPEGBaseline8Bit),
        (encapsulated(mr(study_uid=study_uid, series_uid=mr_series, instance_number=2),
                      JPEGLosslessSV1, [bytes(range(256)) * 3]), JPEGLosslessSV1),
        (encapsulated(ct(study_uid=study_uid, series_uid=ct_series, instance_number=4),
                      RLELossless, [b"\x01\x00\x00\x00" + b"\x40\x00\x00\x00" + b"\x00" * 56
                                    + b"\x7f" * 64]), RLELossless),
    ]
    out = {}
    for i, (ds, ts) in enumerate(items):
        out[str(ds.SOPInstanceUID)] = write(ds, directory / f"obj{i:02d}.dcm", ts)
    return out


def after_meta(path_or_bytes: Path | bytes) -> bytes:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return dataset_bytes_after_meta(data)


def storescu(port: int, files: Sequence[Path], *, called: str = "DICOMFLOW",
             calling: str = "MODALITY", extra: Sequence[str] = (), timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Send ``files`` as they are (no conversion) with DCMTK storescu; returns the result."""
    exe = need("storescu")["storescu"]
    args = [exe, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
            *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# storescu proposes uncompressed transfer syntaxes unless told which compressed one to offer.
_PROPOSE = {ImplicitVRLittleEndian: "-xi", DeflatedExplicitVRLittleEndian: "-xd", JPEGBaseline8Bit: "-xy", JPEGLosslessSV1: "-xs",
            RLELossless: "-xr"}


def send_as_is(port: int, files: Sequence[Path], **kw) -> list[subprocess.CompletedProcess]:
    """storescu runs that send every file in its own transfer syntax (one run per syntax;
    storescu never converts a compressed file), in file order within each syntax."""
    from pydicom import dcmread

    groups: dict[str, list[Path]] = {}
    for path in files:
        ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(ts, ""), []).append(path)
    extra = list(kw.pop("extra", ()))
    return [storescu(port, paths, extra=[*([opt] if opt else []), *extra], **kw)
            for opt, paths in groups.items()]


class Storescp:
    """A DCMTK storescp on 127.0.0.1 writing bit-preserved files into ``directory``."""

    def __init__(self, directory: Path, *, port: int | None = None, aet: str = "PACS",
                 extra: Sequence[str] = (), log: Path | None = None,
                 env: dict[str, str] | None = None, accept_all: bool = True,
                 fork: bool = True) -> None:
        self.exe = need("storescp")["storescp"]
        self.directory = directory
        self.port = port or free_port()
        self._may_choose_port = port is None  # until the first start listened
        self.aet = aet
        self.extra = list(extra)
        self.log = log or directory.parent / f"storescp-{self.port}.log"
        self.env = env
        self.accept_all = accept_all
        self.fork = fork  # children outlive a stopped parent while they sleep in a store
        self.proc: Process | None = None

    def start(self) -> "Storescp":
        """Start and wait until it accepts. At the first start, a port that :func:`free_port`
        chose and another process took meanwhile is chosen again (read :attr:`port` after)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            # +B: write data sets bit-preserving; +xa: accept every transfer syntax DCMTK
            # knows; --fork: one child per association, like a PACS taking parallel ones.
            args = [self.exe, "-aet", self.aet, "-od", str(self.directory), "+B",
                    *(["--fork"] if self.fork else []),
                    *(["+xa"] if self.accept_all else []), *self.extra, str(self.port)]
            self.proc = Process(args, log=self.log, env={**os.environ, **(self.env or {})})
            try:
                wait_for_port(self.port, process=self.proc)
            except ProcessEnded:
                taken = "already in use" in self.log.read_text(errors="replace")
                if not (taken and self._may_choose_port) or attempt == 2:
                    raise
                self.port = free_port()  # the log goes on in the same file
                continue
            self._may_choose_port = False
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def files(self) -> dict[str, bytes]:
        """{SOPInstanceUID: data set bytes after the meta} of every file received so far."""
        from pydicom import dcmread

        out = {}
        for path in self.directory.iterdir():
            if path.is_file() and not path.name.startswith("."):
                ds = dcmread(path, stop_before_pixels=True)
                out[str(ds.SOPInstanceUID)] = after_meta(path)
        return out

    def wait_files(self, count: int, timeout: float = 20.0) -> dict[str, bytes]:
        """storescp renames files into place when complete; wait (bounded) for ``count``."""
        deadline = time.monotonic() + timeout
        while True:
            files = [p for p in self.directory.iterdir() if p.is_file()]
            if len(files) >= count or time.monotonic() > deadline:
                return self.files()
            time.sleep(0.05)

    def __enter__(self) -> "Storescp":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@asynccontextmanager
async def running(*parts, listener=None, deadline: float = 10.0,
                  egress: Sequence[str] = (), restart: RestartPolicy | None = None):
    """Run ``Graph(*parts)`` in the background; yields the Runner, stops it on exit."""
    graph = Graph(*parts, egress=EgressPolicy(EgressConfig(allowed_tcp=list(egress))))
    runner = Runner(graph, restart=restart or RestartPolicy(
        backoff_initial_s=0.01, backoff_max_s=0.05, max_failures=3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(runner.run, deadline=deadline))
        await runner.started.wait()
        if listener is not None:
            # Not a port probe: a connection that never sends an A-ASSOCIATE-RQ stays
            # pending (a place in the connection budget) until negotiation_timeout_ms.
            with trio.fail_after(10):
                await listener.listening.wait()
        try:
            yield runner
        finally:
            runner.stop()


async def run_to_end(*parts, egress: Sequence[str] = (), timeout: float = 60) -> Runner:
    """Run ``Graph(*parts)`` until every lane finished (a Feed ends its lane)."""
    graph = Graph(*parts, egress=EgressPolicy(EgressConfig(allowed_tcp=list(egress))))
    runner = Runner(graph, restart=RestartPolicy(backoff_initial_s=0.01, backoff_max_s=0.05,
                                                 max_failures=3))
    with trio.fail_after(timeout):
        await runner.run()
    return runner


def envelope_of(path: Path) -> Envelope:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return Envelope(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    study_instance_uid=str(ds.StudyInstanceUID), modality=str(ds.Modality))


def deliveries(recorder: Recorder, files: Sequence[Path], *, lane: str = "pacs",
               in_memory: bool = False) -> list[Delivery]:
    """Deliveries of ``files``: FilePayloads, or BytesPayloads with ``in_memory``."""
    return [recorder.delivery(envelope_of(p),
                              BytesPayload(p.read_bytes()) if in_memory else FilePayload(p), lane)
            for p in files]


async def send_all(files: dict[str, Path], peer: "Storescp", sender: Node, *,
                   in_memory: bool = False) -> tuple[Recorder, dict[str, bytes]]:
    """Every file of ``files`` ({uid: path}) through ``sender`` (a CStoreSender aimed at
    ``peer``) to the end; (the recorder of their outcomes, what ``peer`` holds)."""
    cfg = sender.config
    recorder = Recorder()
    items = deliveries(recorder, list(files.values()), in_memory=in_memory)
    await run_to_end(Feed(items, name="feed") >> sender, egress=[f"{cfg.host}:{cfg.port}"])
    return recorder, peer.wait_files(len(files))


# A site graph for `flow run` / `flow check` as a child process: listener -> Store -> pacs,
# addresses from the site file's [listen], [store] and [pacs] tables.
SITE_GRAPH = '''
from flow import Config, Graph
from nodes.dimse import CStoreSender, DicomListener, ListenConfig, PacsConfig
from nodes.store import Store, StoreConfig


class Site(Config, kw_only=True):
    data_dir: str
    listen: ListenConfig
    store: StoreConfig = StoreConfig()
    pacs: PacsConfig


site = Graph.config(Site)
store = Store(site.data_dir, site.store)
graph = Graph(DicomListener(site.listen) >> store >> {"pacs": CStoreSender(site.pacs)},
              name="dimse", state_dir=site.data_dir)
'''


def write_site(directory: Path, pacs_port: int, listen: str = "") -> tuple[int, list[str]]:
    """:data:`SITE_GRAPH` and a site file in ``directory`` (data dir inside it) with a PACS
    on ``pacs_port``; ``listen``: extra ``[listen]`` lines. Returns (the listen port, the
    graph arguments for ``flow run/check/deadletters``)."""
    listen_port = free_port()
    (directory / "site.py").write_text(SITE_GRAPH)
    (directory / "site.toml").write_text(f'''
data_dir = "{directory / 'data'}"
[listen]
port = {listen_port}
ae_title = "DICOMFLOW"
calling_ae_titles = ["MODALITY"]
{listen}
[store]
min_free_disk_mb = 0
[pacs]
host = "127.0.0.1"
port = {pacs_port}
called_ae_title = "PACS"
[egress]
allowed_tcp = ["127.0.0.1:{pacs_port}"]
''')
    return listen_port, [str(directory / "site.py"), "--config", str(directory / "site.toml")]


def pacs_config(port: int, **kw) -> PacsConfig:
    return PacsConfig(host="127.0.0.1", port=port, called_ae_title=kw.pop("called_ae_title", "PACS"),
                      **kw)


def listen_config(port: int | None = None, **kw) -> ListenConfig:
    return ListenConfig(port=port or free_port(), ae_title=kw.pop("ae_title", "DICOMFLOW"), **kw)


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM
    files in ``directory``: {"ca", "server_cert", "server_key", "client_cert", "client_key"}."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("dicomflow test CA"))
          .issuer_name(name("dicomflow test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, san: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, True)
    client, client_key = leaf("MODALITY", ExtendedKeyUsageOID.CLIENT_AUTH, False)
    out = {"ca": directory / "ca.pem", "server_cert": directory / "server.pem",
           "server_key": directory / "server.key", "client_cert": directory / "client.pem",
           "client_key": directory / "client.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["server_cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    out["server_key"].write_bytes(key_pem(server_key))
    out["client_cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    out["client_key"].write_bytes(key_pem(client_key))
    for key in ("server_key", "client_key"):
        out[key].chmod(0o600)
    return out


def storescp_profile(path: Path, sop_classes: Sequence[str]) -> Path:
    """A storescp -xf config accepting only ``sop_classes`` (DCMTK names), any syntax."""
    lines = ["[[TransferSyntaxes]]", "[Any]",
             "TransferSyntax1 = LocalEndianExplicit", "TransferSyntax2 = LittleEndianImplicit",
             "TransferSyntax3 = JPEGBaseline",
             "TransferSyntax4 = JPEGLossless:Non-hierarchical-1stOrderPrediction",
             "TransferSyntax5 = RLELossless", "TransferSyntax6 = DeflatedLittleEndianExplicit",
             "", "[[PresentationContexts]]", "[Some]"]
    lines += [f"PresentationContext{i + 1} = {name}\\Any"
              for i, name in enumerate(["VerificationSOPClass", *sop_classes])]
    lines += ["", "[[Profiles]]", "[Only]", "PresentationContexts = Some", ""]
    path.write_text("\n".join(lines))
    return path


# -- raw DICOM upper layer PDUs, for tests that play a broken or hostile peer -----------------

VERIFICATION = "1.2.840.10008.1.1"
PDU_NAMES = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def associate_rq(*, called: str = "DICOMFLOW", calling: str = "MODALITY",
                 contexts: Sequence[tuple[str, str]] = ((VERIFICATION, ImplicitVRLittleEndian),),
                 max_pdu: int = 16384) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU proposing ``contexts`` (IDs 1, 3, 5, ...), encoded by
    pynetdicom's own PDU classes."""
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                           MaximumLengthNotification)

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    primitive.user_information = [max_length, implementation]
    cxs = []
    for i, (sop_class, ts) in enumerate(contexts):
        cx = build_context(sop_class, [ts])
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    primitive.presentation_context_definition_list = cxs
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (``control``: 0x00 data, 0x02 last data, 0x03
    last command fragment)."""
    import struct

    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def connect_from(source: str, port: int, timeout: float = 10.0):
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source``
    (127.0.0.2, ...: another peer address as far as the listener can tell)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_pdu(sock, timeout: float = 20.0) -> tuple[int, bytes] | None:
    """The next PDU (type, body) the peer sends, or None when it closes (or resets) the
    connection first. Raises TimeoutError when it does neither within ``timeout``."""
    import struct

    sock.settimeout(timeout)

    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = sock.recv(n - len(data))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = exactly(length)
    return None if body is None else (pdu_type, body)


def answer(sock, timeout: float = 20.0) -> str:
    """What the listener does with what ``sock`` sent: "closed", or the name of the PDU it
    answers with (after an A-ASSOCIATE-RJ or A-ABORT the connection must then close)."""
    pdu = read_pdu(sock, timeout)
    if pdu is None:
        return "closed"
    name = PDU_NAMES.get(pdu[0], f"0x{pdu[0]:02X}")
    if name in ("A-ASSOCIATE-RJ", "A-ABORT"):
        assert read_pdu(sock, timeout) is None, f"still open after {name}"
    return name


def still_open(sock) -> bool:
    """True while the peer has neither closed nor reset ``sock`` (nothing is read)."""
    import socket

    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
