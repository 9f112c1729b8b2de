"""JUnit XML: one testsuite, one testcase per KPI; a failure names value, statistic, budget, source."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree as ET

from .document import results_of


def render_junit(doc: dict[str, Any]) -> bytes:
    results = results_of(doc)
    name = "bootimg.kpi" + (f".{doc['manifest']['name']}" if doc.get("manifest") else "")
    failures = sum(r.verdict in ("fail", "not_reached") for r in results)
    errors = sum(r.verdict == "not_measurable" for r in results)
    suite = ET.Element("testsuite", name=name, tests=str(len(results)), failures=str(failures),
                       errors=str(errors), skipped="0", timestamp=doc.get("generated_at", ""))
    props = ET.SubElement(suite, "properties")
    for key, value in (("image.digest", (doc.get("image") or {}).get("digest")), ("target", doc.get("target")),
                       ("boots", str(len(doc.get("boots", [])))), ("percentile_method", doc.get("percentile_method")),
                       ("schema", doc.get("schema"))):
        if value:
            ET.SubElement(props, "property", name=key, value=str(value))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=name, name=r.name,
                             time=f"{(r.value_ms or 0) / 1000:.3f}")
        detail = "\n".join(f"boot {s.boot_id or '?'}{f' ({s.label})' if s.label else ''}: {s.state}"
                           f"{'' if s.value_ms is None else f' {s.value_ms:.1f} ms'} [{s.source}]"
                           f"{f' {s.note}' if s.note else ''}" for s in r.samples)
        if r.verdict in ("fail", "not_reached"):
            el = ET.SubElement(case, "failure", message=r.message, type=r.verdict)
            el.text = detail
        elif r.verdict == "not_measurable":
            el = ET.SubElement(case, "error", message=r.message, type="not_measurable")
            el.text = detail
        out = ET.SubElement(case, "system-out")
        out.text = f"{r.verdict}: {r.message}"
    ET.indent(suite)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="utf-8") + b"\n"
