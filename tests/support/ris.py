"""A real MLLP listener playing the RIS: for the HL7 tests, bench/hl7.py and demos.

Plain blocking sockets in threads, bound to 127.0.0.1, so it serves a Trio sender under test
as well as a synchronous script. It records every message it receives (``messages``) and
answers each with the next of its ``behaviours`` (the last one repeats):

- ``"AA"``, ``"AE"``, ``"AR"``, ``"CA"``, ``"CE"``, ``"CR"``: an ACK with that MSA-1. The
  error codes come with an ERR-3 code (103) and an MSA-3 text that quotes PID-5 (the patient
  name), as some RIS do: the sender must never let that text reach a reason or a log;
- ``"silent"``: read the message, answer nothing;
- ``"drop"``: close the connection without answering;
- ``"garbage"``: answer bytes that are not MLLP;
- ``"wrong_id"``: an AA for another control ID;
- ``"no_msa"``: a framed message that is not an ACK.

    with RisListener(["AE", "AA"]) as ris:
        ...  # send to 127.0.0.1:ris.port
        ris.wait_for(2)

``python -m support.ris PORT [FILE]`` (with ``tests`` on the path) runs it in the foreground,
answering AA and appending each message to FILE, one segment a line: the bench's peer and a
demo RIS. SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

START, END = b"\x0b", b"\x1c\x0d"
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


def _msh_fields(message: bytes) -> list[bytes]:
    return message.split(b"\r", 1)[0].split(b"|")


def control_id(message: bytes) -> bytes:
    msh = _msh_fields(message)
    return msh[9] if len(msh) > 9 else b""


def _patient_name(message: bytes) -> bytes:
    for segment in message.split(b"\r"):
        if segment.startswith(b"PID|"):
            fields = segment.split(b"|")
            return fields[5] if len(fields) > 5 else b""
    return b""


def ack_for(message: bytes, code: str = "AA", *, for_id: bytes | None = None) -> bytes:
    """A framed ACK for ``message`` (MSA-2 = its MSH-10, or ``for_id``)."""
    cid = control_id(message) if for_id is None else for_id
    text = (b"MSH|^~\\&|RIS||DICOMFLOW||20260101000000||ACK^R01^ACK|A" + cid
            + b"|P|2.5.1\rMSA|" + code.encode() + b"|" + cid)
    if code not in ("AA", "CA"):
        text += (b"|Unknown patient " + _patient_name(message)
                 + b"\rERR|||103^Table value not found^HL70357|E")
    return START + text + b"\r" + END


def answer(message: bytes, behaviour: str) -> bytes | None:
    """The bytes to send back for ``behaviour`` (None: send nothing). ``drop`` is not here:
    it is about the connection, not the answer."""
    if behaviour == "silent":
        return None
    if behaviour == "garbage":
        return b"HTTP/1.1 400 Bad Request\r\n\r\n"
    if behaviour == "wrong_id":
        return ack_for(message, "AA", for_id=b"NOT-YOURS")
    if behaviour == "no_msa":
        return START + b"MSH|^~\\&|RIS|||||||X1|P|2.5.1\r" + END
    if behaviour in ACK_CODES:
        return ack_for(message, behaviour)
    raise ValueError(f"unknown behaviour {behaviour!r}")


class RisListener:
    """The listener (see the module docstring). ``ack_code`` is shorthand for
    ``behaviours=[ack_code]``; ``tls`` (a server-side SSLContext) makes it MLLP over TLS;
    ``log_path`` appends every message received to that file."""

    def __init__(self, behaviours: Sequence[str] | None = None, *, port: int = 0,
                 ack_code: str = "AA", tls: ssl.SSLContext | None = None,
                 log_path: str | Path | None = None, max_messages: int = 1_000_000) -> None:
        self.behaviours = list(behaviours or [ack_code])
        for behaviour in self.behaviours:
            if behaviour != "drop":
                answer(b"MSH|^~\\&\r", behaviour)  # unknown behaviours fail here, not later
        self.requested_port = port
        self.port = port
        self.tls = tls
        self.log_path = Path(log_path) if log_path else None
        self.max_messages = max_messages
        self.messages: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._server: socket.socket | None = None
        self._stopping = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "RisListener":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.requested_port))
        server.listen(64)
        server.settimeout(0.2)  # so stop() is noticed promptly
        self._server = server
        self.port = server.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection, wait (bounded) for the threads."""
        self._stopping.set()
        self.drop_connections()
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> "RisListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connections(self) -> None:
        """Close every open connection now, as a RIS that drops idle clients does."""
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    @property
    def open_connections(self) -> int:
        """Connections the peer has not closed yet (as seen from the listener)."""
        with self._lock:
            return len(self._open)

    def wait_for(self, count: int, timeout: float = 30) -> list[bytes]:
        """The messages received, once there are ``count`` of them or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < count:
            time.sleep(0.01)
        with self._lock:
            return list(self.messages)

    # -- serving -------------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _next(self) -> str:
        with self._lock:
            if len(self.behaviours) > 1:
                return self.behaviours.pop(0)
            return self.behaviours[0]

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                try:
                    conn.settimeout(5)
                    conn = self.tls.wrap_socket(conn, server_side=True)
                    conn.settimeout(None)
                except (OSError, ssl.SSLError):
                    conn.close()
                    continue
            with self._lock:
                self.connections += 1
                self._open.add(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self._stopping.is_set() and len(self.messages) < self.max_messages:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while END in buffer:
                    block, buffer = buffer.split(END, 1)
                    message = block.lstrip(b"\r\n").removeprefix(START)
                    self._record(message)
                    behaviour = self._next()
                    if behaviour == "drop":
                        return
                    reply = answer(message, behaviour)
                    if reply is not None:
                        conn.sendall(reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _record(self, message: bytes) -> None:
        with self._lock:
            self.messages.append(message)
            if self.log_path is not None:
                with open(self.log_path, "ab") as out:
                    out.write(message.replace(b"\r", b"\n") + b"\n")


def make_tls(directory: str | Path) -> tuple[ssl.SSLContext, str]:
    """A throw-away CA and a server certificate for 127.0.0.1 (valid one hour) in
    ``directory``: (the listener's server SSLContext, the CA's PEM path for the sender)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: x509.Name, issuer_key, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = (builder
                       .add_extension(x509.SubjectAlternativeName(
                           [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                      critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                           issuer_key.public_key()), critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    directory = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomflow test RIS CA")])
    ca = cert("dicomflow test RIS CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("127.0.0.1", key, ca_name, ca_key, False)
    ca_path = directory / "ris-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_path = directory / "ris-server.pem"
    server_path.write_bytes(server.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_path)
    return context, str(ca_path)


def main(argv: list[str]) -> int:
    import signal

    if not 1 <= len(argv) <= 2:
        print("usage: python -m support.ris PORT [FILE]", file=sys.stderr)
        return 2
    listener = RisListener(port=int(argv[0]), log_path=argv[1] if len(argv) > 1 else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with listener:
        print(f"ris listening on 127.0.0.1:{listener.port}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
