"""The Store's keyring: the current at-rest key for new writes, older keys to read with.

Contract
--------
- The *current* key comes from the configured source (``key_env``, ``key_file`` or the
  default ``<data_dir>/at-rest.key``, see :mod:`nodes.store.crypto`). Everything the Store
  seals from now on is sealed with it.
- *Retired* keys live in the keyring directory next to the key file: ``<key file without
  its suffix>.keyring/`` (default ``<data_dir>/at-rest.keyring/``; with ``key_env``,
  ``<data_dir>/at-rest.keyring/``), one file per key named ``<key_id>.key`` (32 raw bytes,
  mode 0600, the directory 0700). They only ever unseal. A file whose key does not match
  its name is refused.
- :meth:`Keyring.get` returns the key with a given fingerprint or raises
  :class:`KeyNotInKeyring` (never a wrong key).
- :func:`rotate_files` copies the current key into the keyring and stages a new key next
  to the key file; :func:`publish_staged` then replaces the key file with it. Every step is
  atomic and fsynced, so a crash leaves either the old or the new key in the key file and
  the old one in the keyring (see :func:`nodes.store.layout.rotate` for how the data dir's
  record follows, crash-safely).

Nothing here ever prints, logs or raises with key material: errors name files, variables
and fingerprints only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .db import ObjectRecord
from .crypto import (KEY_BYTES, KEY_FILE_NAME, AtRestKey, KeyFileError, fsync_dir,
                     key_from_env, publish_key_file, read_key_file)

__all__ = ["Keyring", "KeyNotInKeyring", "KeySource", "publish_staged", "rotate_files"]

KEYRING_SUFFIX = ".keyring"


class KeyNotInKeyring(LookupError):
    """An object is sealed with a key this process has not loaded (routing-safe message)."""


@dataclass(frozen=True)
class KeySource:
    """Where the current key comes from, as configured (``[store] key_file / key_env``)."""

    data_dir: Path
    key_file: str | None = None
    key_env: str | None = None

    @property
    def path(self) -> Path | None:
        """The key file, or None with ``key_env``."""
        if self.key_env:
            return None
        return Path(self.key_file) if self.key_file else self.data_dir / KEY_FILE_NAME

    @property
    def keyring_dir(self) -> Path:
        path = self.path
        if path is None:
            return self.data_dir / Path(KEY_FILE_NAME).with_suffix(KEYRING_SUFFIX)
        return path.with_suffix(KEYRING_SUFFIX) if path.suffix else \
            path.with_name(path.name + KEYRING_SUFFIX)

    def describe(self) -> str:
        """``key file '/path'`` or ``environment variable 'NAME'`` (for messages)."""
        if self.key_env:
            return f"environment variable {self.key_env!r}"
        return f"key file {str(self.path)!r}"

    def exists(self) -> bool:
        if self.key_env:
            return True  # an unset variable is reported by load() itself
        assert self.path is not None
        return os.path.lexists(self.path)

    def load(self, *, create: bool) -> AtRestKey:
        """The current key; generated into the key file only when ``create`` (an empty data
        dir). Raises :class:`KeyFileError`."""
        if self.key_env:
            return AtRestKey(key_from_env(self.key_env))
        assert self.path is not None
        if not create and not self.exists():
            raise KeyFileError(
                f"{self.describe()} is missing, but data dir {str(self.data_dir)!r} already "
                f"holds data sealed with its key; restore the key file from its backup (a "
                f"fresh key would make everything stored unreadable)")
        return AtRestKey.load(self.data_dir, self.key_file, None)


@dataclass(eq=False)
class Keyring:
    """The current key and every retired key found in the keyring directory."""

    current: AtRestKey
    source: KeySource
    retired: dict[str, AtRestKey] = field(default_factory=dict)
    original: str = ""  # the key of format-1 objects (no key id), as the data dir records

    @classmethod
    def load(cls, source: KeySource, *, create: bool) -> "Keyring":
        """Blocking; raises :class:`KeyFileError`."""
        current = source.load(create=create)
        return cls(current, source, _read_keyring_dir(source.keyring_dir))

    def get(self, key_id: str) -> AtRestKey:
        if key_id == self.current.key_id:
            return self.current
        try:
            return self.retired[key_id]
        except KeyError:
            raise KeyNotInKeyring(
                f"sealed with key {key_id}, which is neither the current key "
                f"{self.current.key_id} nor in the keyring {str(self.source.keyring_dir)!r}"
            ) from None

    def key_for(self, obj: ObjectRecord) -> AtRestKey:
        """The key that sealed ``obj``'s bytes; raises :class:`KeyNotInKeyring`."""
        return self.get(obj.key or self.original)

    def __contains__(self, key_id: str) -> bool:
        return key_id == self.current.key_id or key_id in self.retired


def _read_keyring_dir(directory: Path) -> dict[str, AtRestKey]:
    if not directory.is_dir():
        return {}
    keys = {}
    for path in sorted(directory.glob("*.key")):
        master = read_key_file(path)
        if master is None:  # removed while we listed
            continue
        key = AtRestKey(master)
        if key.key_id != path.stem:
            raise KeyFileError(f"keyring file {str(path)!r} holds key {key.key_id}, not the "
                               f"key its name says; rename or remove it")
        keys[key.key_id] = key
    return keys


def retire_file(source: KeySource, master: bytes) -> AtRestKey:
    """Copy ``master`` into the keyring directory as ``<key_id>.key`` (idempotent)."""
    key = AtRestKey(master)
    path = source.keyring_dir / f"{key.key_id}.key"
    publish_key_file(path, master, where="keyring")
    return key


def rotate_files(source: KeySource) -> tuple[AtRestKey, Path, AtRestKey]:
    """Step one of a rotation: the current key copied into the keyring and a new random key
    written (fsynced) to a staged file next to the key file.

    Returns ``(old key, staged file, new key)``; the key file itself is unchanged until
    :func:`publish_staged`. Blocking; raises :class:`KeyFileError`.
    """
    path = source.path
    if path is None:
        raise KeyFileError(
            f"{source.describe()}: `flow keys rotate` replaces a key file; with key_env, "
            f"configure key_file instead (see docs/operations.md, \"Key rotation\")")
    master = read_key_file(path)
    if master is None:
        raise KeyFileError(f"{source.describe()} is missing: nothing to rotate")
    old = retire_file(source, master)
    fresh = os.urandom(KEY_BYTES)
    staged = path.with_name(f".{path.name}.rotate.tmp")
    staged.unlink(missing_ok=True)  # left by a rotation that crashed before publishing
    publish_key_file(staged, fresh, where="key_file")
    return old, staged, AtRestKey(fresh)


def publish_staged(source: KeySource, staged: Path) -> None:
    """Atomically replace the key file with the staged one and fsync the directory."""
    assert source.path is not None
    try:
        os.replace(staged, source.path)
        fsync_dir(source.path.parent)
    except OSError as exc:
        raise KeyFileError(f"{source.describe()}: cannot replace it with the new key "
                           f"({exc.strerror or type(exc).__name__})") from None
