"""KPI reports: JSON is the source of truth (``document``); JUnit XML, HTML and Markdown are
rendered from it and from nothing else."""

from .document import SCHEMA, build_report, load_boots, load_report, report_bytes
from .html import render_html
from .junit import render_junit
from .markdown import render_markdown

__all__ = ["SCHEMA", "build_report", "load_boots", "load_report", "render_html", "render_junit",
           "render_markdown", "report_bytes"]
