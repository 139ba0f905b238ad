"""Self-contained HTML pages (the EDA and results reports): headings, tables, base64 PNG figures, no scripts.

Shared by :mod:`pipeline.eda` and :mod:`pipeline.results` so both reports look the same.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Iterable, Optional

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#222;margin:0;background:#f4f5f7}
main{max-width:1280px;margin:0 auto;padding:0 24px 40px}
header{background:#24313f;color:#fff;padding:18px 24px}header h1{margin:0 0 4px;font-size:24px}
header p{margin:0;color:#c9d3dd}
nav{background:#fff;border-bottom:1px solid #dde;padding:8px 24px;position:sticky;top:0}
nav a{margin-right:14px;color:#3b6fb6;text-decoration:none;font-weight:600}
section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;margin:18px 0;padding:6px 20px 16px}
h2{font-size:19px;border-bottom:2px solid #3b6fb6;padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d8dce1;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.warn{color:#b03a2e;font-weight:600}.ok{color:#2a7d4f;font-weight:600}.muted{color:#666}
ul.sugg li{margin:4px 0}code{background:#eef1f5;padding:1px 4px;border-radius:3px;font-size:12px}
.cols{display:flex;gap:28px;flex-wrap:wrap}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: Any) -> str:
    """Numbers with sensible precision, everything else as text."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], limit: Optional[int] = None,
          source: str = "eda.json") -> str:
    """An HTML table; numeric cells right-aligned; at most ``limit`` rows with a note on the rest."""
    rows = list(rows)
    shown = rows if limit is None else rows[:limit]
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown)
    rest = len(rows) - len(shown)
    more = f'<p class="muted">… and {rest:,} more (see {esc(source)})</p>' if rest else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="n">{esc(fmt(value))}</td>' if numeric else f"<td>{esc(fmt(value))}</td>"


def figure(b64: Optional[str], alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: list[str], nav: list[tuple[str, str]]) -> str:
    """The whole page: header, a sticky navigation bar of ``(anchor, title)`` links, the sections."""
    links = "".join(f'<a href="#{k}">{esc(t)}</a>' for k, t in nav)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<nav>{links}</nav><main>{''.join(sections)}</main></body></html>")


def png_base64(fig) -> str:
    """A matplotlib Figure as a base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")
