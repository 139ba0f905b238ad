"""The self-contained EDA page: headings, tables of figures and base64 PNG plots, no scripts, no links out.

:func:`render` turns the ``eda.json`` dict plus the figure images into one HTML string; the page pieces are
shared with the results report (:mod:`pipeline.report.webpage`).
"""
from __future__ import annotations

from pipeline.report import webpage
from pipeline.report.webpage import CSS, esc, figure, fmt, section, table  # noqa: F401 - the EDA sections' building blocks

HTML_ROWS = 25  # listed rows per table in the page; eda.json and the CSV keep more, the counts are exact

SECTIONS = [("summary", "Summary"), ("classes", "Classes"), ("images", "Image properties"),
            ("colour", "Colour & normalization"), ("samples", "Samples"), ("files", "Unreadable files"),
            ("duplicates", "Duplicates")]


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return webpage.page(title, subtitle, sections, SECTIONS)
