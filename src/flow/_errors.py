"""Errors the runtime raises. Each message says what is wrong and where, without PHI."""

from __future__ import annotations


class FlowError(Exception):
    """Base class: a one-line, user-facing message (the CLI prints it without a traceback)."""


class ConfigError(FlowError):
    """The site config cannot be used: unreadable, unknown or missing key, wrong type."""


class GraphError(FlowError):
    """The graph is malformed: names, ports, cycles, fan-out rules. Names the node and port."""


class EgressDenied(FlowError):
    """An outbound target is not inside the ``[egress]`` allowlist (fail-closed)."""
