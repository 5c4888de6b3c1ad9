"""Site config: a TOML file decoded by msgspec into the typed Structs a graph declares.

The runtime owns three tables of every site file, ``[egress]`` (the outbound allowlist),
``[runtime]`` (shutdown deadline, restart policy) and ``[admin]`` (the HTTP admin endpoint,
off when the table is absent); everything else is decoded into the schema
the graph file passes to :meth:`flow.Graph.config`. Unknown keys, missing keys and wrong types
are :class:`~flow.ConfigError`\\ s that name the file and the dotted key, e.g.
``site.toml: unknown key pacs.caled_ae_title``.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from ._egress import EgressConfig, EgressPolicy
from ._errors import ConfigError

T = TypeVar("T")


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base for site-config Structs: unknown keys are errors, fields keyword-only, immutable."""


class RestartPolicy(Config):
    """How the supervisor restarts a node that raised (DESIGN.md, "The runtime")."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    jitter: float = 0.25          # each delay is scaled by a random factor in [1-j, 1+j]
    max_failures: int = 5         # this many failures within window_s → the node is failed
    window_s: float = 60.0


class RuntimeConfig(Config):
    """The ``[runtime]`` table.

    processes: how many OS processes run the graph (:mod:`flow._processes`): ``"auto"``
        (one per core this process may use), or a number; 1 runs everything in one process.
    lanes_nice: with several processes, how much lower the lane processes' CPU priority is
        than the ingest's (added to their nice value, 0-19): when the cores are short, the
        modalities waiting for their answers come first and the durable lanes catch up after.
    """

    shutdown_deadline_s: float = 10.0
    restart: RestartPolicy = RestartPolicy()
    processes: int | Literal["auto"] = "auto"
    lanes_nice: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.processes, int) and self.processes < 1:
            raise ValueError("processes must be at least 1 (or \"auto\")")
        if not 0 <= self.lanes_nice <= 19:
            raise ValueError("lanes_nice must be from 0 to 19")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback literals; host names are never resolved."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminConfig(Config):
    """The ``[admin]`` table: where the admin endpoint (``/metrics``, ``/status``,
    ``/healthz``, the status page) listens. Like a DICOM listener, a non-loopback ``host``
    needs TLS (``tls_cert``/``tls_key``) unless ``allow_cleartext = true``."""

    host: str = "127.0.0.1"
    port: int = 9180
    tls_cert: str = ""
    tls_key: str = ""
    allow_cleartext: bool = False
    # How often the page's throughput chart takes a sample: each reads every lane's figures
    # (as `flow status` does), so not much more often than a Prometheus scrape.
    sample_interval_s: float = 10.0
    chart_window_s: float = 600.0     # how far back the chart reaches
    refresh_s: int = 10               # the page reloads itself this often

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535 (0: any free port)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if not self.tls and not self.allow_cleartext and not is_loopback(self.host):
            raise ValueError(f"serving the admin endpoint on {self.host} without TLS is "
                             "refused: set tls_cert and tls_key, or allow_cleartext = true")
        if self.sample_interval_s <= 0 or self.chart_window_s < self.sample_interval_s:
            raise ValueError("sample_interval_s must be positive and at most chart_window_s")
        if self.refresh_s < 1:
            raise ValueError("refresh_s must be at least 1")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True)
class SiteFile:
    """A parsed site file: the raw tables for the graph's schema, plus the runtime's own."""

    path: Path
    raw: dict[str, Any]
    egress: EgressPolicy
    runtime: RuntimeConfig
    admin: AdminConfig | None = None  # None: no [admin] table, no admin endpoint

    @property
    def name(self) -> str:
        return str(self.path)


_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`(?: - at `(?P<at>[^`]*)`)?")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]*)`(?: - at `(?P<at>[^`]*)`)?")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<at>[^`]*)`)?$", re.S)


def _dotted(at: str | None, field: str | None = None) -> str:
    path = (at or "$").removeprefix("$").lstrip(".")
    if field:
        path = f"{path}.{field}" if path else field
    return path or "(top level)"


def describe_validation_error(source: str, exc: msgspec.ValidationError, prefix: str = "") -> str:
    """Turn msgspec's message into ``file: unknown key a.b`` style text."""
    text = str(exc)

    def key(at: str | None, field: str | None = None) -> str:
        dotted = _dotted(at, field)
        return f"{prefix}.{dotted}" if prefix and dotted != "(top level)" else (prefix or dotted)

    if m := _UNKNOWN.match(text):
        return f"{source}: unknown key {key(m['at'], m['field'])}"
    if m := _MISSING.match(text):
        return f"{source}: missing key {key(m['at'], m['field'])}"
    m = _AT.match(text)
    assert m is not None
    message = m["msg"].replace("`", "")
    message = message[0].lower() + message[1:] if message else message
    return f"{source}: key {key(m['at'])}: {message}"


def convert(raw: Any, schema: type[T], *, source: str, prefix: str = "") -> T:
    """Decode ``raw`` (TOML tables) into ``schema`` or raise a ConfigError naming the key."""
    try:
        return msgspec.convert(raw, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe_validation_error(source, exc, prefix)) from None


def read_site_file(path: str | Path) -> SiteFile:
    """Parse a TOML site file and its runtime-owned tables. Raises ConfigError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    source = str(path)
    egress = convert(raw.pop("egress", {}), EgressConfig, source=source, prefix="egress")
    runtime = convert(raw.pop("runtime", {}), RuntimeConfig, source=source, prefix="runtime")
    admin_raw = raw.pop("admin", None)
    admin = None if admin_raw is None else convert(admin_raw, AdminConfig, source=source,
                                                   prefix="admin")
    return SiteFile(path, raw, EgressPolicy(egress, source=source), runtime, admin)


def check_schema(schema: type) -> None:
    """Refuse schemas that would silently ignore unknown keys (a misspelt key must fail)."""
    seen: set[type] = set()

    def walk(tp: Any) -> None:
        for arg in typing.get_args(tp):
            walk(arg)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and tp not in seen:
            seen.add(tp)
            if not tp.__struct_config__.forbid_unknown_fields:
                raise TypeError(f"config schema {tp.__qualname__} must be declared with "
                                "forbid_unknown_fields=True (or derive from flow.Config) so "
                                "that a misspelt key is an error")
            for hint in typing.get_type_hints(tp).values():
                walk(hint)

    walk(schema)


# The site file of the graph being loaded; set by flow.load() around the graph module's
# execution so that Graph.config() can find it without globals leaking across reloads.
current_site: contextvars.ContextVar[SiteFile | None] = contextvars.ContextVar(
    "flow_current_site", default=None)


def site_config(schema: type[T]) -> T:
    """Decode the current site file into ``schema`` (see :meth:`flow.Graph.config`)."""
    site = current_site.get()
    if site is None:
        raise ConfigError("Graph.config() reads the site file given to `flow --config FILE`; "
                          "load this graph with `flow run GRAPH.py --config FILE` "
                          "(or flow.load() in tests)")
    check_schema(schema)
    return convert(site.raw, schema, source=site.name)
