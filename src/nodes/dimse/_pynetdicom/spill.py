"""pynetdicom's chunked C-STORE receive into a :class:`SpillFile` (group ``spill``).

pynetdicom would create a named temp file and encode a file meta with pydicom for every
object, ~1 ms of CPU in its receive thread even for an 8 KB object. :func:`receive_into_spill_files`
replaces three module globals of ``pynetdicom.dimse_messages`` (used there for nothing
else) so that the data set goes into a :class:`SpillFile`: in memory up to ``INLINE_MAX``,
moved to a file in the spool dir only beyond that.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from typing import Any

from pynetdicom import dimse_messages
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta

from ...dicom.filemeta import encode_file_meta
from ..arrived import INLINE_MAX  # a received data set up to this size stays in memory

_spool_lock = threading.Lock()
_spool_dir: list[str | None] = [None]


def use_spool_dir(path: str | None) -> None:
    """Where received data sets above ``INLINE_MAX`` are written (process-wide; None: the
    system temp dir)."""
    with _spool_lock:
        _spool_dir[0] = path




class _SpillMeta:
    """What pynetdicom's ``create_file_meta`` is asked for, kept as three strings: the meta
    group is encoded by :func:`encode_file_meta` only if the data set spills to a file."""

    __slots__ = ("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid")

    def __init__(self, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
                 **_implementation: Any) -> None:  # implementation UID/version: ours go in
        self.sop_class_uid = str(sop_class_uid)
        self.sop_instance_uid = str(sop_instance_uid)
        self.transfer_syntax_uid = str(transfer_syntax)


class SpillFile:
    """pynetdicom's chunked-receive target for one C-STORE data set.

    pynetdicom writes the preamble, ``DICM`` and the file meta, then every P-DATA fragment
    of the data set. The data set stays in memory while it is at most ``threshold`` bytes;
    past that, a Part 10 file (our meta, then the data set so far) is created at ``name``
    and the rest is appended there. ``name`` is reserved from the start because pynetdicom
    reads it at once; the file exists only once spilled (pynetdicom's best-effort unlink
    after the C-STORE handler tolerates a file that never existed).
    """

    def __init__(self, directory: str | None, threshold: int = INLINE_MAX) -> None:
        # The owner's pid in the name: a sibling process sharing the spool dir sweeps the
        # file only once this process is gone (sweep_spill_files).
        self.name = os.path.join(directory or tempfile.gettempdir(),
                                 f"{os.getpid()}-{os.urandom(12).hex()}{SPILL_SUFFIX}")
        self.threshold = threshold
        self.file = self  # pynetdicom flushes ``.file`` after every fragment
        self.meta: _SpillMeta | None = None
        self.dataset_offset = 0  # where the data set starts in the spilled file
        self._chunks: list[bytes] = []
        self._size = 0
        self._fh: Any = None
        self._discarded = False
        self.failed: OSError | None = None  # the spill file could not be written (disk full)

    @property
    def spilled(self) -> bool:
        return self._fh is not None

    @property
    def dataset_size(self) -> int:
        return self._size

    def begin_dataset(self, meta: _SpillMeta) -> None:
        """The meta is known: whatever was written so far (preamble, ``DICM``) is the file
        header, rebuilt by :func:`encode_file_meta` if the data set spills."""
        self.meta = meta
        self._chunks, self._size = [], 0

    def write(self, data: bytes) -> int:
        # Discarded: the association ended mid-transfer, nothing will read this. Failed:
        # the rest of the data set is read off the wire and dropped; the listener answers.
        if self._discarded or self.failed is not None:
            return len(data)
        if self._fh is not None:
            self._size += len(data)
            try:
                return self._fh.write(data)
            except ValueError:  # closed under us by discard() from the association's thread
                if self._discarded:
                    return len(data)
                raise
            except OSError as exc:
                self._fail(exc)
                return len(data)
        self._chunks.append(bytes(data))
        self._size += len(data)
        if self.meta is not None and self._size > self.threshold:
            try:
                self._spill()
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def _fail(self, exc: OSError) -> None:
        """The spill file cannot be written (ENOSPC, say): keep nothing of it, remember why.
        Raising instead would abort the association from pynetdicom's thread, and the
        sender would get no answer at all; the listener answers from :attr:`failed`."""
        self.failed = exc
        self._chunks = []
        if self._fh is not None:
            try:
                self._fh.close()  # flushing what is buffered can fail the same way
            except OSError:
                pass
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass

    def _spill(self) -> None:
        assert self.meta is not None
        meta = self.meta
        header = encode_file_meta(meta.sop_class_uid, meta.sop_instance_uid,
                                  meta.transfer_syntax_uid)
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(header)
        self.dataset_offset = len(header)
        for chunk in self._chunks:
            self._fh.write(chunk)
        self._chunks = []

    def getvalue(self) -> bytes:
        """The data set received so far (only while it is in memory)."""
        if self._fh is not None:
            raise ValueError("the data set was spilled to a file")
        return b"".join(self._chunks)

    def flush(self) -> None:
        if self._fh is not None and self.failed is None and not self._fh.closed:
            try:
                self._fh.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def discard(self) -> None:
        """Drop a data set whose C-STORE will never be handled (the association aborted or
        ended mid-transfer): pynetdicom deletes a spool file only after the handler ran."""
        self._discarded = True
        self._chunks = []
        self.close()
        if self._fh is not None:
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass


SPILL_SUFFIX = ".dcm"
_SPILL_NAME = re.compile(r"(?:([0-9]+)-)?[0-9a-f]{24}\.dcm")  # (owner pid-)random.dcm
SPILL_ORPHAN_AGE_S = 3600.0  # far longer than any network timeout: no transfer is live


def discard_partial(assoc: Any) -> None:
    """Discard the data set ``assoc`` was receiving when it ended, if any."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    spill = getattr(message, "_data_set_file", None)
    if isinstance(spill, SpillFile):
        spill.discard()


def sweep_spill_files(directory: str | None, *, older_than_s: float = SPILL_ORPHAN_AGE_S,
                      now: float | None = None) -> int:
    """Delete spill files a killed process left in ``directory`` (None: the system temp
    dir), names of our form only: at once when the pid in the name is no process's (its
    owner is gone), otherwise (a live process's, this one's, a name without a pid, or a
    pid reused since) only when not written to for ``older_than_s``. So processes sharing
    the spool dir (listener workers) never delete each other's objects in transfer.
    Returns how many."""
    directory = directory or tempfile.gettempdir()
    limit = (time.time() if now is None else now) - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        named = _SPILL_NAME.fullmatch(entry.name)
        if named is None:
            continue
        owner = named.group(1)
        try:
            if entry.is_file(follow_symlinks=False) and (
                    (owner is not None and not _alive(int(owner)))
                    or entry.stat().st_mtime < limit):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    """A process ``pid`` exists (another user's included; this host's pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _new_spill_file(*_args: Any, **_kwargs: Any) -> SpillFile:
    return SpillFile(_spool_dir[0])


def new_spill(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> SpillFile:
    """A SpillFile ready for a data set's bytes (what pynetdicom's chunked receive makes of
    its temp file, preamble and file meta), for :func:`.cstore.receive_stores_directly`."""
    spill = SpillFile(_spool_dir[0])
    spill.begin_dataset(_SpillMeta(sop_class_uid, sop_instance_uid, transfer_syntax_uid))
    return spill


def _write_file_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(fp, SpillFile) and isinstance(file_meta, _SpillMeta):
        fp.begin_dataset(file_meta)
    else:  # not ours: pynetdicom's own behaviour
        _pydicom_write_file_meta(fp, file_meta, enforce_standard)


def receive_into_spill_files() -> None:
    """Point pynetdicom's chunked receive (module ``dimse_messages``, where these three names
    are used for nothing else) at :class:`SpillFile`. Called only when group ``spill`` is
    usable; otherwise pynetdicom's stock temp-file receive stays in place: slower, equally
    correct (the listener reads either)."""
    dimse_messages.NamedTemporaryFile = _new_spill_file  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = _SpillMeta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined]
