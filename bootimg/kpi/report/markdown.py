"""A Markdown summary for a terminal or a pull request."""

from __future__ import annotations

from typing import Any

from .document import results_of

ICON = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "not_reached": "NOT REACHED",
        "not_measurable": "NOT MEASURABLE"}


def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.3f} s"


def render_markdown(doc: dict[str, Any]) -> str:
    results = results_of(doc)
    boots = doc.get("boots", [])
    m = doc.get("manifest") or {}
    lines = [f"## Boot KPIs{': ' + m['name'] + ' ' + m.get('version', '') if m else ''} — "
             f"**{ICON.get(doc.get('verdict', ''), doc.get('verdict', '?'))}**", ""]
    img = doc.get("image") or {}
    if img.get("digests"):
        lines.append(f"Image: `{', '.join(img['digests'])}` (verity: {', '.join(img.get('verity') or []) or '?'})")
    else:
        lines.append("Image: not recorded (no /run/bootimg/booted.json on the target)")
    labels = [b.get("label") for b in boots if b.get("label")]
    lines.append(f"Boots: {len(boots)}" + (f" ({', '.join(labels)})" if labels else "") +
                 f"; target: `{doc.get('target')}`")
    lines += ["", "| KPI | measure | statistic | value | warn | fail | max/boot | n | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        meas = r.measure + (f" `{r.unit}`" if r.unit else "") + f" since {r.since}"
        lines.append(f"| {r.name} | {meas} | {r.statistic} | {_s(r.value_ms)} | {_s(r.warn_ms)} | "
                     f"{_s(r.fail_ms)} | {_s(r.max_ms)} | {r.stats.get('n', 0)}/{len(r.samples)} | "
                     f"{ICON.get(r.verdict, r.verdict)} |")
    notes = [r for r in results if r.verdict != "pass"]
    if notes:
        lines += [""] + [f"- **{r.name}** ({ICON[r.verdict]}): {r.message}" for r in notes]
    lines += ["", "| boot | label | firmware | loader | kernel | initrd | userspace | `systemd-analyze time` |",
              "|---|---|---|---|---|---|---|---|"]
    for b in boots:
        ph = b.get("phases", {})
        cell = lambda k: _s(ph[k]["usec"] / 1000) if ph.get(k, {}).get("state") == "ok" else ph.get(k, {}).get("state", "–")  # noqa: E731
        at = (b.get("analyze_time") or "not finished").replace("\n", " ")
        lines.append(f"| `{(b.get('boot_id') or '?')[:12]}` | {b.get('label') or ''} | {cell('firmware')} | "
                     f"{cell('loader')} | {cell('kernel')} | "
                     f"{cell('initrd')} | {cell('userspace')} | {at} |")
    lines += ["", f"Percentiles: {doc.get('percentile_method')}.", ""]
    return "\n".join(lines)
