"""The admin endpoint's HTML: the status page at ``/`` and an item's trace page.

Plain server-rendered HTML with inline CSS and an inline SVG chart: no script, no external
asset, no build step. Every value that reaches the page goes through :func:`esc` (or
:func:`quote` inside a URL), whatever its source.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote as _quote

# The lane figures shown first, in this order; any other figure a node reports follows.
LANE_COLUMNS = ("state", "queued", "in_flight", "retrying", "delivered", "skipped",
                "dead_lettered", "oldest_age_s", "last_error_class")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176b17;font-weight:bold}.bad{color:#b00;font-weight:bold}
.muted{color:#666}code{font-size:.95em}
td.small{font-size:.8em;color:#555;max-width:32em}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def quote(value: str) -> str:
    return _quote(value, safe="")


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"


def is_time(key: str) -> bool:
    """Fields that hold epoch seconds by this project's naming (``t``, ``since``, ``*_at``)."""
    return key in ("t", "since") or key.endswith("_at")


def _document(title: str, body: str, *, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{refresh}'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="n">{esc(value)}</td>' if numeric else f"<td>{esc(value)}</td>"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
          links: dict[str, str] | None = None, small: Sequence[str] = ()) -> str:
    """``rows`` as a table of ``columns``; ``links`` maps a column to a URL prefix, the cell
    then links to prefix + quoted value; ``small`` columns are set in small print."""
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if links and column in links and value:
                cells.append(f'<td><a href="{esc(links[column] + quote(str(value)))}">'
                             f"<code>{esc(value)}</code></a></td>")
            elif is_time(column) and isinstance(value, (int, float)):
                cells.append(f"<td>{esc(when(value))}</td>")
            elif column in small:
                cells.append(f'<td class="small">{esc(value)}</td>')
            else:
                cells.append(_cell(value))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def columns_of(rows: Sequence[dict[str, Any]], first: Sequence[str]) -> list[str]:
    seen = [c for c in first if any(c in row for row in rows)]
    rest = sorted({k for row in rows for k in row} - set(seen))
    return seen + rest


def chart(samples: Sequence[tuple[float, dict[str, int]]], lanes: Sequence[str], *,
          now: float, window_s: float, width: int = 640, height: int = 170) -> str:
    """Deliveries per minute of each lane over the last ``window_s``, as inline SVG.

    ``samples``: (time, {lane: delivered so far}) in time order; a rate is the difference of
    two neighbours over their interval (a counter that went back counts as zero)."""
    left, bottom, top, right = 48, 22, 10, 10
    plot_w, plot_h = width - left - right, height - top - bottom
    series: dict[str, list[tuple[float, float]]] = {lane: [] for lane in lanes}
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        if t1 <= t0 or t1 < now - window_s:
            continue
        for lane in lanes:
            delta = max(0, b.get(lane, 0) - a.get(lane, 0))
            series[lane].append((t1, delta * 60.0 / (t1 - t0)))
    peak = max([rate for points in series.values() for _, rate in points] + [1.0])

    def x(t: float) -> float:
        return left + plot_w * (1 - (now - t) / window_s)

    def y(rate: float) -> float:
        return top + plot_h * (1 - rate / peak)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="deliveries per minute by lane">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
             f'stroke="#bbb"/>',
             f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">'
             f"{esc(f'{peak:.0f}')}</text>",
             f'<text x="{left - 4}" y="{top + plot_h}" font-size="11" text-anchor="end">0</text>',
             f'<text x="{left}" y="{height - 6}" font-size="11">'
             f"-{esc(f'{window_s / 60:g}')} min</text>",
             f'<text x="{left + plot_w}" y="{height - 6}" font-size="11" text-anchor="end">'
             f"now (deliveries/min)</text>"]
    for i, lane in enumerate(lanes):
        color = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in series[lane])
        if points:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                         f'points="{points}"/>')
        parts.append(f'<text x="{left + 8 + 110 * i}" y="{top + 14}" font-size="11" '
                     f'fill="{color}">&#9632; {esc(lane)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def status_page(doc: dict[str, Any], dead: Sequence[dict[str, Any]],
                samples: Sequence[tuple[float, dict[str, int]]], *, unhealthy: dict[str, str],
                now: float, window_s: float, refresh_s: int) -> str:
    """The page at ``/``: health, lanes, throughput chart, nodes, newest dead letters."""
    lanes = []
    for name, figures in doc["lanes"].items():  # the main figures, then the rest in one cell
        row = {"lane": name, **{k: v for k, v in figures.items() if k in LANE_COLUMNS}}
        row["more"] = " ".join(f"{k}={v}" for k, v in sorted(figures.items())
                               if k not in LANE_COLUMNS and v is not None)
        lanes.append(row)
    charted = [name for name, figures in doc["lanes"].items() if "delivered" in figures]
    health = ('<p class="ok">healthy: every lane runs</p>' if not unhealthy else
              '<p class="bad">unhealthy: ' + ", ".join(
                  f"lane {esc(lane)} {esc(state)}" for lane, state in unhealthy.items())
              + "</p>")
    pid = f" (pid {esc(doc['pid'])})" if doc.get("pid") else ""
    body = [
        f"<h1>dicomflow: graph {esc(doc['graph'])}</h1>",
        f'<p class="muted">{"running" if doc["running"] else "not running"}{pid}, '
        f"{esc(when(now))}; refreshes every {int(refresh_s)} s. "
        '<a href="/metrics">metrics</a> · <a href="/status">status JSON</a> · '
        '<a href="/healthz">healthz</a></p>',
        health,
        "<h2>Lanes</h2>",
        table(lanes, ["lane", *[c for c in LANE_COLUMNS if any(c in r for r in lanes)], "more"],
              small=("more",)),
        "<h2>Throughput</h2>",
        chart(samples, charted, now=now, window_s=window_s),
        "<h2>Nodes</h2>",
        table(doc["nodes"], columns_of(doc["nodes"], ("node", "lane", "state", "restarts",
                                                      "last_error_class"))),
        f"<h2>Newest dead letters ({len(dead)})</h2>",
        table(dead, columns_of(dead, ("since", "lane", "item", "reason", "attempts")),
              links={"item": "/trace/"}),
    ]
    return _document(f"dicomflow {doc['graph']}", "".join(body), refresh_s=refresh_s)


def _field(key: str, value: Any) -> str:
    return esc(when(value)) if is_time(key) and isinstance(value, (int, float)) else _value(value)


def _value(value: Any) -> str:
    """Nested dicts and lists of dicts as tables; anything else as escaped text."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{_field(k, v)}</td></tr>"
                       for k, v in value.items())
        return f"<table>{rows}</table>" if rows else '<span class="muted">-</span>'
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return table(value, columns_of(value, ("t", "event", "lane")))
    if isinstance(value, list):
        return esc("; ".join(map(str, value)))
    return esc(value)


def trace_page(item: str, traces: dict[str, dict[str, Any]]) -> str:
    """``item``'s journey as each node that knows it reports it (``{node: trace}``)."""
    body = [f"<h1>Trace of <code>{esc(item)}</code></h1>",
            '<p><a href="/">back to the status page</a></p>']
    if not traces:
        body.append('<p class="bad">no node has a record of this item</p>')
    for node, doc in traces.items():
        body.append(f"<h2>in {esc(node)}</h2>")
        for key, value in doc.items():
            body.append(f"<h3>{esc(key)}</h3>{_value(value)}")
    return _document(f"trace {item}", "".join(body))
