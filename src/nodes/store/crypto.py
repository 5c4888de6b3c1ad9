"""The at-rest key: AES-256-GCM sealing of everything PHI-bearing the Store writes to disk.

Contract
--------
:meth:`AtRestKey.seal` returns ``nonce (12 bytes) || ciphertext || tag (16 bytes)`` with a
fresh random 96-bit nonce per call; :meth:`AtRestKey.unseal` returns the plaintext or raises
:class:`Tampered` — for a flipped bit, a truncation, the wrong AAD or the wrong key alike, and
never with the library's ``InvalidTag`` chained to it. The AAD (associated data) is
authenticated, not encrypted: callers bind each sealed value to where it belongs (for
example its SOPInstanceUID and record kind) so a value moved to another record fails.

The configured 32-byte key is never used directly: HKDF-SHA256 derives the AES-256 key
(info ``b"dicomflow at-rest v1 aes-256-gcm"``) and, separately, the fingerprint
:attr:`AtRestKey.key_id` (first 8 hex digits of the SHA-256 of an HKDF output with info
``b"dicomflow at-rest v1 key-id"``). The fingerprint identifies a key in logs and
``flow status`` without revealing anything usable about it.

Random nonces are safe for up to 2**32 seals per key (NIST SP 800-38D, section 8.3); a spool
file spends one per MiB, so that is about four billion small objects or four pebibytes of
spooled data per key.

Key handling (for operators)
----------------------------
Where the key comes from, in this order:

1. ``key_env``: the name of an environment variable holding the standard base64 of 32 bytes
   (for example ``head -c 32 /dev/urandom | base64``). When it is configured and the variable
   is unset, start fails; nothing falls back to a file.
2. ``key_file``: a file holding either exactly 32 raw bytes or the base64 of 32 bytes (a
   trailing newline is fine). Default: ``<data_dir>/at-rest.key``. The file must be a regular
   file with no permission bits for group or other (``chmod 600``); otherwise start fails
   with a message that names the file and says to ``chmod 600`` it.
3. Neither present: on first start of an empty data dir (the Store decides, see
   :mod:`nodes.store.layout`), a key is generated from ``os.urandom(32)`` and written to
   the key file (default location) with mode 0600. A data dir that already holds data never
   gets a fresh key: a missing key file is then an error. A new key is written to a
   temporary file, fsynced, then hard-linked into place, so no partial key file is ever
   visible and two processes starting at once end up with the same key; the directory is
   fsynced too. A missing data dir is created with mode 0700.

Errors (:class:`KeyFileError`, a :class:`flow.ConfigError`, so ``flow`` prints it as one
line) name the file or variable and what to do; they never contain key material.

**Back the key up, separately from the data.** The data dir is useless without it: when the
key is lost, every stored object, spool file and PHI-bearing record is unreadable, by design,
and there is no recovery. Keep the backup out of the data dir's backups, or the encryption
protects nothing when a backup is lost.

**Rotation and the data dir's key record**: see :mod:`nodes.store.keyring` (older keys stay
readable from a keyring; ``flow keys rotate``) and :mod:`nodes.store.layout` (the data dir
records its key's fingerprint, :attr:`AtRestKey.key_id`, and refuses any other key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flow import ConfigError

__all__ = ["AtRestKey", "KeyFileError", "Tampered", "fsync_dir", "publish_key_file",
           "read_key_file", "key_from_env", "KEY_BYTES", "KEY_FILE_NAME", "NONCE_BYTES",
           "TAG_BYTES", "SEAL_OVERHEAD"]

KEY_BYTES = 32
NONCE_BYTES = 12  # 96-bit nonces: GCM's native size, no GHASH of the nonce needed
TAG_BYTES = 16
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES
KEY_FILE_NAME = "at-rest.key"

_INFO_AES = b"dicomflow at-rest v1 aes-256-gcm"
_INFO_KEY_ID = b"dicomflow at-rest v1 key-id"
_MAX_KEY_FILE = 4096  # a key file is 32 or ~45 bytes; do not slurp a misconfigured large file


class KeyFileError(ConfigError):
    """The at-rest key cannot be loaded or created. Names the file or variable, never the key."""


class Tampered(Exception):
    """Sealed data failed authentication: modified, truncated, reordered, wrong context or key.

    Carries no plaintext and no key material; safe to log and to record as a routing-safe
    reason next to the SOPInstanceUID.
    """


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a create, rename or unlink in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(master)


class AtRestKey:
    """An AES-256-GCM key for data at rest. Build it with :meth:`load`."""

    __slots__ = ("_aead", "key_id")

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_BYTES:
            raise ValueError(f"an at-rest key is {KEY_BYTES} bytes, got {len(master)}")
        self._aead = AESGCM(_derive(master, _INFO_AES))
        self.key_id: str = hashlib.sha256(_derive(master, _INFO_KEY_ID)).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"AtRestKey(key_id={self.key_id!r})"

    def __reduce__(self):  # never let the key travel through pickle (multiprocessing, caches)
        raise TypeError("AtRestKey cannot be pickled")

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str], key_file: str | None = None,
             key_env: str | None = None) -> AtRestKey:
        """The key from ``key_env`` if given, else from ``key_file`` (default
        ``<data_dir>/at-rest.key``), generating that file on first use.

        Blocking (file I/O and fsync): call it at start, or in ``trio.to_thread.run_sync``.
        Raises :class:`KeyFileError`; see the module docstring for the rules.
        """
        if key_env:
            return cls(key_from_env(key_env))
        path = Path(key_file) if key_file else Path(data_dir) / KEY_FILE_NAME
        master = read_key_file(path)
        if master is None:
            master = _create_key_file(path, data_dir if not key_file else None)
        return cls(master)

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """``nonce || ciphertext || tag`` of ``plaintext``, authenticated together with ``aad``."""
        nonce, body = self.seal_parts(plaintext, aad)
        return nonce + body

    def seal_parts(self, plaintext: bytes, aad: bytes = b"") -> tuple[bytes, bytes]:
        """:meth:`seal` as ``(nonce, ciphertext || tag)``, for writers that would otherwise
        copy a large chunk only to prepend 12 bytes (``os.writev`` takes both)."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, sealed: bytes, aad: bytes = b"") -> bytes:
        """The plaintext of :meth:`seal`'s output under the same ``aad``; else :class:`Tampered`."""
        if len(sealed) < SEAL_OVERHEAD:
            raise Tampered(f"sealed value is {len(sealed)} bytes, shorter than nonce and tag "
                           f"(truncated); key {self.key_id}")
        view = memoryview(sealed)
        try:
            return self._aead.decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], aad)
        except InvalidTag:
            pass  # raised outside the handler so InvalidTag is not the implicit __context__
        raise Tampered(f"sealed value failed authentication (modified, truncated, wrong "
                       f"context or not sealed with key {self.key_id})")


def _decode_b64_key(text: bytes) -> bytes | None:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_BYTES else None


def key_from_env(name: str) -> bytes:
    raw = os.environ.get(name)
    if raw is None:
        raise KeyFileError(f"key_env: environment variable {name!r} is not set "
                           f"(it must hold the base64 of a {KEY_BYTES}-byte key)")
    key = _decode_b64_key(raw.encode("ascii", "replace"))
    if key is None:
        raise KeyFileError(f"key_env: environment variable {name!r} is not the standard base64 "
                           f"of {KEY_BYTES} bytes (create one with "
                           f"`head -c {KEY_BYTES} /dev/urandom | base64`)")
    return key


def read_key_file(path: Path) -> bytes | None:
    """The key in ``path``, or None when the file does not exist. Raises
    :class:`KeyFileError` for a file that is not a private regular file holding a key."""
    try:
        # O_NONBLOCK: a FIFO configured by mistake is refused below instead of hanging start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"key file {str(path)!r}: cannot open "
                           f"({exc.strerror or type(exc).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {str(path)!r} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {str(path)!r} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
                f"other may access it; run `chmod 600 {path}` (owner read/write only)")
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"key file {str(path)!r}: cannot read "
                           f"({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    if len(data) == KEY_BYTES:
        return data
    key = _decode_b64_key(data) if len(data) <= _MAX_KEY_FILE else None
    if key is None:
        raise KeyFileError(f"key file {str(path)!r} must hold {KEY_BYTES} raw bytes or the "
                           f"base64 of {KEY_BYTES} bytes; it holds {len(data)} bytes that are "
                           f"neither")
    return key


def _create_key_file(path: Path, data_dir: str | os.PathLike[str] | None) -> bytes:
    """Generate a key and publish it at ``path`` atomically; the winner's key if we race."""
    where = "data_dir" if data_dir is not None else "key_file"
    return publish_key_file(path, os.urandom(KEY_BYTES), where=where)


def publish_key_file(path: Path, key: bytes, *, replace: bool = False,
                     where: str = "key_file") -> bytes:
    """Write ``key`` to ``path`` (mode 0600, fsynced, directory fsynced) so that no partial
    file is ever visible there; returns the key ``path`` holds afterwards.

    Without ``replace`` an existing file wins (two processes creating a key at once agree on
    one); with it, ``path`` is atomically replaced. ``where`` names the setting in errors.
    Blocking; raises :class:`KeyFileError`.
    """
    parent = path.parent
    try:
        created = _make_private_dir(parent)
        tmp = parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        published = True
        try:
            if replace:
                os.replace(tmp, path)
            else:
                # link() fails if the name exists, like O_EXCL, but the file it publishes is
                # already complete: a crash never leaves an empty key file behind.
                os.link(tmp, path)
        except FileExistsError:
            published = False
        finally:
            if not replace or not published:
                tmp.unlink(missing_ok=True)
        fsync_dir(parent)
        if created:
            fsync_dir(parent.parent)
    except OSError as exc:
        raise KeyFileError(f"{where}: cannot create key file {str(path)!r} "
                           f"({exc.strerror or type(exc).__name__})") from None
    if published:
        return key
    existing = read_key_file(path)  # another process published its key first: use that one
    if existing is None:  # the name exists for link() but not for open(): a dangling symlink
        raise KeyFileError(f"key file {str(path)!r} exists but cannot be opened (a "
                           f"symlink to a missing file?); fix or remove it")
    return existing


def _make_private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) if missing; True when this call created it."""
    if path.is_dir():
        return False
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)  # makedirs' mode is filtered through the umask
    return True
