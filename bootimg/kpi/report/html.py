"""A self-contained HTML page: verdicts, an inline SVG timeline (phases, milestones, the KPI
units as bars, budget lines) and one distribution strip per KPI over the N boots. No scripts,
no external resources: it opens from a CI artifact store as it is."""

from __future__ import annotations

import html
import statistics
from typing import Any

from ..stats import percentile
from .document import results_of

COLORS = {"pass": "#1a7f37", "warn": "#b26b00", "fail": "#c62828", "not_reached": "#c62828",
          "not_measurable": "#6a1b9a"}
PHASE_COLORS = {"firmware": "#cfd8dc", "loader": "#b39ddb", "kernel": "#90caf9", "initrd": "#ffcc80",
                "userspace": "#a5d6a7"}
MILESTONE_LABELS = {"initrd_start": "initrd", "root_mounted": "root mounted", "switch_root": "switch-root",
                    "default_target": "default target", "boot_finished": "finished"}

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:13px;margin:2px 0} code{font-size:12px;background:#f6f8fa;padding:1px 4px;border-radius:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;color:#fff;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.verdict{font-size:15px;margin:8px 0} svg{display:block;margin:6px 0}
.msg{font-size:12px;color:#57606a} .small{font-size:12px}
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _badge(verdict: str) -> str:
    return f'<span class="badge" style="background:{COLORS.get(verdict, "#555")}">{_e(verdict.replace("_", " "))}</span>'


def _entry(boot: dict[str, Any]) -> str:
    """The loader entry a boot came from, and its tries left when boot counting was on."""
    e = (boot.get("system") or {}).get("boot_entry") or {}
    if not e.get("selected"):
        return "–"
    tries = f" ({e['tries_left']} tries left)" if e.get("tries_left") is not None else ""
    bad = [x["id"] for x in e.get("entries", []) if x.get("state") == "bad"]
    return _e((e.get("id") or e["selected"]) + tries + (f"; tries used up: {', '.join(bad)}" if bad else ""))


def _sec(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.3f} s"


def _representative(boots: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The boot whose finish time is the median one (the timeline shows a typical boot)."""
    if not boots:
        return None
    def finish(b: dict[str, Any]) -> float:
        v = b["milestones"].get("boot_finished", {})
        return v.get("usec") or 0 if v.get("state") == "ok" else float("inf")
    ordered = sorted(boots, key=finish)
    return ordered[(len(ordered) - 1) // 2]


def _timeline(doc: dict[str, Any], results: list, boot: dict[str, Any]) -> str:
    """x: seconds since kernel start (a container: since its userspace start)."""
    host = boot.get("clock") == "host"
    us = boot.get("userspace_usec") or 0
    base_us = us if host else 0  # what x=0 is, on the record's clock

    def x_of_abs(usec: float) -> float:
        return (usec - base_us) / 1e6

    def kpi_x(r: Any, value_ms: float) -> float:  # a sample's value -> timeline x
        if r.since == "userspace_start":
            return (us - base_us) / 1e6 + value_ms / 1000
        return value_ms / 1000 if not host else float("nan")

    ms = boot.get("milestones", {})
    ph = boot.get("phases", {})
    # UEFI boots: firmware and loader run before kernel start (negative x); QEMU's direct kernel
    # boot and containers have neither.
    pre = {k: ph[k]["usec"] for k in ("firmware", "loader") if not host and ph.get(k, {}).get("state") == "ok"}
    start = -(sum(pre.values()) / 1e6)
    end = 0.0
    for v in ms.values():
        if v.get("state") == "ok" and v.get("usec") is not None:
            end = max(end, x_of_abs(v["usec"]))
    for r in results:
        for s in r.samples:
            if s.state == "ok" and s.value_ms is not None:
                x = kpi_x(r, s.value_ms)
                if x == x:
                    end = max(end, x)
    data_end = max(end, 0.1)
    for r in results:  # budget lines widen the axis only when they are near the data
        for lim in (r.warn_ms, r.fail_ms, r.max_ms):
            x = kpi_x(r, lim) if lim else float("nan")
            if x == x and x <= 2.0 * data_end:
                end = max(end, x)
    end = max(end * 1.06, 0.5)
    left, width, row_h, top = 190, 900, 26, 34
    sx = lambda x: left + width * (max(start, x) - start) / (end - start)  # noqa: E731
    kpi_rows = [r for r in results if r.measure != "root_hook"]   # a duration: in the tables, not on the time axis
    height = top + row_h * (2 + len(kpi_rows)) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 170}" height="{height}" '
           f'viewBox="0 0 {left + width + 170} {height}" style="max-width:100%;height:auto" '
           f'font-family="system-ui,sans-serif" font-size="12" role="img" aria-label="boot timeline">']
    # grid
    step = next(s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120) if (end - start) / s <= 14)
    t = -(-start // step) * -step if start < 0 else 0.0
    while t <= end + 1e-9:
        X = sx(t)
        out.append(f'<line x1="{X:.1f}" y1="{top - 6}" x2="{X:.1f}" y2="{height - 30}" stroke="#eaeef2"/>')
        out.append(f'<text x="{X:.1f}" y="{height - 14}" text-anchor="middle" fill="#57606a">{t:g}s</text>')
        t += step
    out.append(f'<text x="{left}" y="16" fill="#57606a">seconds since {"container (userspace) start" if host else "kernel start"}'
               f' — boot {_e((boot.get("boot_id") or "?")[:12])}{" (" + _e(boot["label"]) + ")" if boot.get("label") else ""}</text>')
    # phases row
    y = top
    out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">phases</text>')
    initrd_us = ms.get("initrd_start", {}).get("usec") if ms.get("initrd_start", {}).get("state") == "ok" else None
    finish_us = ms.get("boot_finished", {}).get("usec") if ms.get("boot_finished", {}).get("state") == "ok" else None
    segs = []
    if "firmware" in pre:
        segs.append(("firmware", -sum(pre.values()), -pre.get("loader", 0)))
    if "loader" in pre:
        segs.append(("loader", -pre["loader"], 0))
    if not host:
        kd = initrd_us if initrd_us else us
        segs.append(("kernel", 0, kd))
        if initrd_us:
            segs.append(("initrd", initrd_us, us))
    if finish_us:
        segs.append(("userspace", us, finish_us))
    for name, a, b in segs:
        xa, xb = sx(x_of_abs(a)), sx(x_of_abs(b))
        out.append(f'<rect x="{xa:.1f}" y="{y + 3}" width="{max(1.0, xb - xa):.1f}" height="{row_h - 8}" '
                   f'fill="{PHASE_COLORS[name]}"><title>{name}: {(b - a) / 1e6:.3f} s</title></rect>')
        if xb - xa > 60:
            out.append(f'<text x="{(xa + xb) / 2:.1f}" y="{y + 17}" text-anchor="middle">{name} {(b - a) / 1e6:.2f}s</text>')
    # milestones row
    y += row_h
    out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">milestones</text>')
    for i, (key, label) in enumerate(MILESTONE_LABELS.items()):
        v = ms.get(key, {})
        if v.get("state") != "ok" or v.get("usec") is None:
            continue
        X = sx(x_of_abs(v["usec"]))
        out.append(f'<line x1="{X:.1f}" y1="{y + 2}" x2="{X:.1f}" y2="{height - 30}" stroke="#8250df" '
                   f'stroke-dasharray="2,3" opacity="0.5"/>')
        out.append(f'<circle cx="{X:.1f}" cy="{y + 12}" r="4" fill="#8250df"><title>{label}: {x_of_abs(v["usec"]):.3f} s '
                   f'({_e(v.get("source"))})</title></circle>')
        out.append(f'<text x="{X + 5:.1f}" y="{y + 8 + (i % 2) * 12}" fill="#8250df" font-size="11">{label}</text>')
    # one row per KPI: the unit's activating->active bar, each boot's value, budget lines
    units = boot.get("units", {})
    for r in kpi_rows:
        y += row_h
        color = COLORS.get(r.verdict, "#555")
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end" fill="{color}">{_e(r.name)}</text>')
        u = units.get(r.unit) if r.unit else None
        if u and u.get("activating_usec") and u.get("active_usec") and (not host or r.since == "userspace_start"):
            xa, xb = sx(x_of_abs(u["activating_usec"])), sx(x_of_abs(u["active_usec"]))
            out.append(f'<rect x="{xa:.1f}" y="{y + 5}" width="{max(1.5, xb - xa):.1f}" height="{row_h - 12}" '
                       f'fill="{color}" opacity="0.35"><title>{_e(r.unit)}: activating {x_of_abs(u["activating_usec"]):.3f} s '
                       f'-> active {x_of_abs(u["active_usec"]):.3f} s (Type={_e(u.get("type"))})</title></rect>')
        far = []
        for lim, col, dash in ((r.warn_ms, "#b26b00", "5,3"), (r.fail_ms, "#c62828", ""), (r.max_ms, "#000", "1,2")):
            if lim is None:
                continue
            X = kpi_x(r, lim)
            if X != X:
                continue
            if X > end:  # off the axis: named at the right
                word = {"#b26b00": "warn", "#c62828": "fail", "#000": "max"}[col]
                far.append(f'<tspan fill="{col}">{word} {lim / 1000:g}s</tspan>')
                continue
            out.append(f'<line x1="{sx(X):.1f}" y1="{y + 1}" x2="{sx(X):.1f}" y2="{y + row_h - 1}" stroke="{col}" '
                       f'stroke-width="2" stroke-dasharray="{dash}"><title>{_e(r.name)} budget {lim} ms</title></line>')
        if far:
            out.append(f'<text x="{left + width + 10}" y="{y + 16}" font-size="10">{" ".join(far)} ›</text>')
        for s in r.samples:
            if s.state == "ok" and s.value_ms is not None:
                X = kpi_x(r, s.value_ms)
                if X == X:
                    out.append(f'<circle cx="{sx(X):.1f}" cy="{y + row_h / 2:.1f}" r="3.5" fill="{color}" '
                               f'stroke="#fff"><title>boot {_e((s.boot_id or "?")[:12])}: {s.value_ms:.1f} ms</title></circle>')
        if r.verdict in ("not_reached", "not_measurable") or (host and r.since != "userspace_start"):
            out.append(f'<text x="{left + 6}" y="{y + 16}" fill="{color}" font-size="11">{_e(r.verdict.replace("_", " "))}: '
                       f'{_e(r.message[:110])}</text>')
    out.append("</svg>")
    legend = ('<div class="small">Bars: phases (<span style="color:#1565c0">kernel</span>, '
              '<span style="color:#e65100">initrd</span>, <span style="color:#2e7d32">userspace</span>); per KPI: '
              'the unit from activating to active, each boot\'s value (dots), warn (dashed orange), '
              'fail (red) and per-boot max (dotted black) budgets.</div>')
    return "\n".join(out) + legend


def _distribution(r: Any) -> str:
    values = [s.value_ms for s in r.samples if s.state == "ok" and s.value_ms is not None]
    lims = [v for v in (r.warn_ms, r.fail_ms, r.max_ms) if v]
    top = max(values) if values else max(lims + [1.0])
    near = [v for v in lims if v <= 3 * top]  # budgets far off the data are named, not drawn
    hi = max([top] + near + [1.0]) * 1.12
    lo = 0.0
    left, width, h = 10, 300, 46
    sx = lambda v: left + width * (v - lo) / (hi - lo)  # noqa: E731
    color = COLORS.get(r.verdict, "#555")
    # viewBox + max-width: the plot shrinks with its table column instead of widening the page
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{h + 14}" '
           f'viewBox="0 0 {left + width + 20} {h + 14}" style="max-width:100%;height:auto" '
           f'font-family="system-ui,sans-serif" font-size="10">']
    out.append(f'<line x1="{left}" y1="{h - 10}" x2="{left + width}" y2="{h - 10}" stroke="#8c959f"/>')
    for k in range(0, 5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<text x="{sx(v):.1f}" y="{h + 4}" text-anchor="middle" fill="#57606a">{v / 1000:.2f}s</text>')
    if values:
        q1, q3 = percentile(values, 25), percentile(values, 75)
        out.append(f'<rect x="{sx(min(values)):.1f}" y="14" width="{max(1.0, sx(max(values)) - sx(min(values))):.1f}" '
                   f'height="2" fill="{color}" opacity="0.5"/>')
        out.append(f'<rect x="{sx(q1):.1f}" y="8" width="{max(1.5, sx(q3) - sx(q1)):.1f}" height="14" fill="{color}" '
                   f'opacity="0.25"/>')
        med = statistics.median(values)
        out.append(f'<line x1="{sx(med):.1f}" y1="6" x2="{sx(med):.1f}" y2="24" stroke="{color}" stroke-width="2">'
                   f'<title>median {med:.1f} ms</title></line>')
        for i, s in enumerate(x for x in r.samples if x.state == "ok" and x.value_ms is not None):
            out.append(f'<circle cx="{sx(s.value_ms):.1f}" cy="{30 + (i % 3) * 3}" r="3" fill="{color}" opacity="0.8">'
                       f'<title>boot {_e((s.boot_id or "?")[:12])} {_e(s.label or "")}: {s.value_ms:.1f} ms</title></circle>')
        if r.value_ms is not None:
            out.append(f'<path d="M{sx(r.value_ms):.1f},2 l-4,-0 l4,6 l4,-6 z" fill="#000"><title>{r.statistic} '
                       f'{r.value_ms:.1f} ms</title></path>')
    far = []
    for lim, col, dash in ((r.warn_ms, "#b26b00", "5,3"), (r.fail_ms, "#c62828", ""), (r.max_ms, "#000", "1,2")):
        if lim and lim <= hi:
            out.append(f'<line x1="{sx(lim):.1f}" y1="2" x2="{sx(lim):.1f}" y2="{h - 10}" stroke="{col}" stroke-width="1.5" '
                       f'stroke-dasharray="{dash}"/>')
        elif lim:
            far.append(f'<tspan fill="{col}">{lim / 1000:g}s</tspan>')
    if far:
        out.append(f'<text x="{left + width + 18}" y="12" text-anchor="end">{" ".join(far)} ›</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(doc: dict[str, Any]) -> str:
    results = results_of(doc)
    boots = doc.get("boots", [])
    m = doc.get("manifest") or {}
    title = f"Boot KPIs — {m.get('name', 'target')} {m.get('version', '')}".strip()
    img = doc.get("image") or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f'<div class="verdict">Overall: {_badge(doc.get("verdict", "?"))} &nbsp; exit code {doc.get("exit_code")}</div>',
             f'<div class="meta">Image digest: <code>{_e(", ".join(img.get("digests") or []) or "not recorded")}</code>'
             f' &nbsp; verity: {_e(", ".join(img.get("verity") or []) or "?")}</div>',
             f'<div class="meta">Boots: {len(boots)} &nbsp; target: <code>{_e(doc.get("target"))}</code> &nbsp; '
             f'generated {_e(doc.get("generated_at", ""))} by {_e(doc.get("tool", ""))}</div>']
    if m.get("path"):
        parts.append(f'<div class="meta">Manifest: <code>{_e(m["path"])}</code> sha256 <code>{_e(m.get("sha256", "")[:16])}…</code></div>')
    parts.append("<h2>KPIs</h2><table><tr><th>KPI</th><th>measure</th><th>statistic</th><th>value</th><th>warn</th>"
                 "<th>fail</th><th>max/boot</th><th>n</th><th>verdict</th><th>distribution over boots</th></tr>")
    for r in results:
        meas = _e(r.measure) + (f" <code>{_e(r.unit)}</code>" if r.unit else "") + f"<br><span class='msg'>since {_e(r.since)}"
        meas += (f"; Type={_e(r.readiness)}" if r.readiness else "") + "</span>"
        parts.append(f"<tr><td><b>{_e(r.name)}</b><div class='msg'>{_e(r.message)}</div></td><td>{meas}</td>"
                     f"<td>{_e(r.statistic)}</td><td class='num'>{_sec(r.value_ms)}</td><td class='num'>{_sec(r.warn_ms)}</td>"
                     f"<td class='num'>{_sec(r.fail_ms)}</td><td class='num'>{_sec(r.max_ms)}</td>"
                     f"<td class='num'>{r.stats.get('n', 0)}/{len(r.samples)}</td><td>{_badge(r.verdict)}</td>"
                     f"<td>{_distribution(r)}</td></tr>")
    parts.append("</table>")
    rep = _representative(boots)
    if rep is not None:
        parts.append("<h2>Timeline (the median boot)</h2>")
        parts.append(_timeline(doc, results, rep))
    parts.append("<h2>Statistics</h2><table><tr><th>KPI</th>" + "".join(
        f"<th>{k}</th>" for k in ("n", "min", "median", "mean", "p90", "p95", "max", "stdev")) + "<th>sources</th></tr>")
    for r in results:
        cells = "".join(f"<td class='num'>{'–' if r.stats.get(k) is None else (r.stats[k] if k == 'n' else f'{r.stats[k]:.1f}')}</td>"
                        for k in ("n", "min", "median", "mean", "p90", "p95", "max", "stdev"))
        parts.append(f"<tr><td>{_e(r.name)}</td>{cells}<td class='msg'>{_e('; '.join(r.sources))}</td></tr>")
    parts.append(f"</table><div class='msg'>Milliseconds. Percentiles: {_e(doc.get('percentile_method'))}.</div>")
    parts.append("<h2>Boots</h2><table><tr><th>boot id</th><th>label</th><th>firmware</th><th>loader</th><th>kernel</th>"
                 "<th>initrd</th><th>userspace</th><th>systemd-analyze time</th><th>image</th><th>entry</th><th>source</th></tr>")
    for b in boots:
        ph = b.get("phases", {})
        cell = lambda k: _sec(ph[k]["usec"] / 1000) if ph.get(k, {}).get("state") == "ok" else _e(ph.get(k, {}).get("state", "–"))  # noqa: E731
        digest = (b.get("booted") or {}).get("digest")
        parts.append(f"<tr><td><code>{_e((b.get('boot_id') or '?')[:12])}</code></td><td>{_e(b.get('label') or '')}</td>"
                     f"<td class='num'>{cell('firmware')}</td><td class='num'>{cell('loader')}</td>"
                     f"<td class='num'>{cell('kernel')}</td><td class='num'>{cell('initrd')}</td>"
                     f"<td class='num'>{cell('userspace')}</td><td class='small'>{_e(b.get('analyze_time') or 'not finished')}</td>"
                     f"<td><code>{_e((digest or 'not recorded')[:20])}</code></td><td class='small'>{_entry(b)}</td>"
                     f"<td class='msg'>{_e(b.get('source'))}</td></tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)
