"""`bootimg kpi collect|run|report|compare`: measure boots, judge them against the manifest, report.

Exit codes of run/report: 0 every KPI passed or warned, 1 a KPI failed (or was not reached),
2 a boot could not be measured (unreachable target, boot not finished, KPI not measurable).
compare: 0 no regression, 1 a regression.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import BootimgError
from ..fsutil import write_atomically


def _manifest(path: str | None):
    if not path:
        return None
    from ..manifest import load_manifest

    return load_manifest(path)


def manifest_units(m) -> tuple[list[str], list[tuple[str, str]]]:
    """The units the manifest's KPIs measure and its boot-time containers (name, unit)."""
    if m is None:
        return [], []
    containers = [(c.name, m.unit_name(c.name)) for c in m.containers]
    units = [m.unit_name(b.unit) for b in m.all_budgets() if b.unit]
    return units, containers


def _target_args(p: argparse.ArgumentParser, *, journal: bool = False) -> None:
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--local", action="store_true", help="this machine's system bus")
    g.add_argument("--container", metavar="ROOT|PID", help="a running nspawn container: its root directory "
                                                           "or the host PID of its init")
    g.add_argument("--ssh", metavar="HOST", help="a board over ssh ([user@]host; pystemd runs "
                                                 "systemd-stdio-bridge there, like systemd-analyze -H)")
    g.add_argument("--ssh-config", metavar="FILE", help="ssh config file (e.g. one defining Host board)")
    g.add_argument("--port", type=int, metavar="N", help="ssh port")
    g.add_argument("--address", metavar="ADDR", help="a D-Bus address, e.g. unix:path=/run/forwarded.sock")
    if journal:
        g.add_argument("--journal-dir", metavar="DIR", help="a journal directory pulled off a board "
                                                            "(implies --history; no live target)")
    p.add_argument("--via", choices=("auto", "pystemd", "busctl"), default="auto",
                   help="data path: pystemd (one shared connection) or busctl --json (no pystemd); "
                        "default: pystemd when installed")


def _open(args: argparse.Namespace):
    from .transport import open_transport

    return open_transport(local=args.local, container=args.container, ssh=args.ssh, ssh_config=args.ssh_config,
                          ssh_port=args.port, address=args.address, via=args.via)


def _write(path: str | Path, data: bytes | str) -> None:
    write_atomically(path, data.encode() if isinstance(data, str) else data)


def _summary(rec) -> str:
    lines = [f"boot {rec.boot_id or '?'}" + (f" ({rec.label})" if rec.label else "") + f" via {rec.source}"]
    lines.append("  " + (rec.analyze_time or "boot not finished").replace("\n", "\n  "))
    if rec.image_digest:
        lines.append(f"  image {rec.image_digest} (verity {rec.booted.get('verity')})")
    base = "host monotonic (container)" if rec.clock == "host" else "since kernel start"
    for name, v in rec.milestones.items():
        val = f"{v.usec / 1e6:10.3f} s" if v.usec is not None else " " * 12
        lines.append(f"  {name:24s} {v.state:15s}{val}  [{v.source}]{' ' + v.note if v.note else ''}")
    lines.append(f"  (milestones: {base})")
    return "\n".join(lines)


# -- collect ----------------------------------------------------------------------------------

def _cmd_collect(args: argparse.Namespace) -> int:
    from .collect import collect, record_property_set
    from .history import history, local_runner
    from .report.document import boots_document
    from .transport import RecordedTransport, Recorder

    m = _manifest(args.manifest)
    units, containers = manifest_units(m)
    units += args.unit or []
    if args.journal_dir:
        records = history(local_runner, directory=args.journal_dir, units=units, containers=containers)
    elif args.recorded:
        with RecordedTransport(args.recorded) as t:
            records = [collect(t, units, containers=containers, label=args.label)]
    else:
        transport = _open(args)
        recorder = Recorder(transport) if args.record else None
        try:
            if args.history:
                records = history(lambda argv: transport.run(argv), units=units, containers=containers,
                                  source=f"journal via {transport.describe()}")
            else:
                records = [collect(recorder or transport, units, containers=containers, label=args.label)]
        finally:
            transport.close()
        if recorder is not None:
            _write(args.record, json.dumps(record_property_set(recorder), indent=1) + "\n")
    if not records:
        raise BootimgError("no boots found" + (f" in {args.journal_dir}" if args.journal_dir else ""))
    if args.output:
        _write(args.output, json.dumps(boots_document(records), indent=2) + "\n")
    if args.json:
        json.dump(boots_document(records), sys.stdout, indent=2)
        print()
    else:
        for r in records:
            print(_summary(r))
    return 0


# -- report -----------------------------------------------------------------------------------

def _budgets_of(doc: dict[str, Any]):
    from .report.document import budget_from_dict

    return [budget_from_dict(b) for b in doc.get("budgets", [])]


def write_outputs(doc: dict[str, Any], *, out_dir: str | None = None, json_path: str | None = None,
                  junit: str | None = None, html: str | None = None, markdown: str | None = None) -> list[Path]:
    from .report import render_html, render_junit, render_markdown, report_bytes

    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        json_path = json_path or str(d / "kpi.json")
        junit = junit or str(d / "kpi.junit.xml")
        html = html or str(d / "kpi.html")
        markdown = markdown or str(d / "kpi.md")
    written = []
    for path, render in ((json_path, report_bytes), (junit, render_junit), (html, render_html),
                         (markdown, render_markdown)):
        if path:
            _write(path, render(doc))
            written.append(Path(path))
    return written


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import render_markdown
    from .report.document import _load_json, build_report, load_boots

    m = _manifest(args.manifest)
    boots, budgets, carried = [], None, {}
    for path in args.inputs:
        boots += load_boots(path)
        if m is None:
            doc = _load_json(path)
            if doc.get("budgets"):
                budgets = _budgets_of(doc)
                carried = {k: doc[k] for k in ("manifest", "target") if doc.get(k)}
    if args.exclude_label:
        boots = [b for b in boots if b.label not in set(args.exclude_label)]
    if m is None and budgets is None:
        raise BootimgError("no budgets: pass --manifest (the inputs are collections without budgets)")
    doc = build_report(boots, m, budgets, extra=carried)
    write_outputs(doc, out_dir=args.output_dir, json_path=args.json, junit=args.junit, html=args.html,
                  markdown=args.markdown)
    print(render_markdown(doc))
    return doc["exit_code"]


# -- compare ----------------------------------------------------------------------------------

def _cmd_compare(args: argparse.Namespace) -> int:
    from .judge import compare
    from .report.document import load_report, results_of

    cur, base = load_report(args.current), load_report(args.baseline)
    deltas = compare(results_of(cur), results_of(base), rel=args.rel, abs_ms=args.abs_ms)
    dc, db = (cur.get("image") or {}).get("digest"), (base.get("image") or {}).get("digest")
    doc = {"schema": "bootimg.kpi.compare/1", "current": args.current, "baseline": args.baseline,
           "current_image": dc, "baseline_image": db, "thresholds": {"rel": args.rel, "abs_ms": args.abs_ms},
           "regressions": sum(d.flag == "regression" for d in deltas), "deltas": [d.to_dict() for d in deltas]}
    lines = [f"## Boot KPI comparison: {args.current} vs baseline {args.baseline}", "",
             f"Images: `{dc or '?'}` vs `{db or '?'}`; a regression exceeds both {args.abs_ms:.0f} ms "
             f"and {args.rel * 100:.0f}%.", "", "| KPI | statistic | baseline | current | delta | |",
             "|---|---|---|---|---|---|"]
    for d in deltas:
        f = lambda v: "–" if v is None else f"{v / 1000:.3f} s"  # noqa: E731
        rel = "" if d.delta_rel is None else f" ({d.delta_rel * 100:+.1f}%)"
        lines.append(f"| {d.name} | {d.statistic} | {f(d.baseline_ms)} | {f(d.current_ms)} | "
                     f"{'–' if d.delta_ms is None else f'{d.delta_ms:+.0f} ms'}{rel} | {d.flag.upper()} |")
    text = "\n".join(lines) + "\n"
    if args.json:
        _write(args.json, json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        _write(args.markdown, text)
    print(text)
    return 1 if doc["regressions"] else 0


# -- run --------------------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    from .report import render_markdown
    from .report.document import build_report
    from .run import container_booter, qemu_booter, run_boots, ssh_reboot_booter

    m = _manifest(args.manifest)
    units, containers = manifest_units(m)
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    kinds = [k for k in ("disk", "ssh", "container_root") if getattr(args, k)]
    if len(kinds) != 1:
        raise BootimgError("name exactly one target: --disk DISK, --ssh HOST or --container-root DIR")
    out = Path(args.output_dir)
    target = ""
    if args.disk:
        from ..vm.commands import machine_of

        machine = machine_of(args)
        serial = out / "serial" if args.serial_logs else None
        if serial:
            serial.mkdir(parents=True, exist_ok=True)
        booter = qemu_booter(machine, timeout=args.timeout, serial_dir=serial, via=args.via, log=log)
        target = f"QEMU ({'UEFI' if machine.uefi else 'direct kernel boot'}) {Path(args.disk).name}"
    elif args.ssh:
        booter = ssh_reboot_booter(args.ssh, ssh_config=args.ssh_config, ssh_port=args.port, via=args.via,
                                   boot_timeout=args.timeout)
        target = f"ssh {args.ssh} (reboots)"
    else:
        booter = container_booter(args.container_root, via=args.via)
        target = f"nspawn container {args.container_root}"
    boots = run_boots(args.times, booter, units, containers=containers, finish_timeout=args.timeout, log=log)
    doc = build_report(boots, m, target=target)
    written = write_outputs(doc, out_dir=str(out))
    print(render_markdown(doc))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return doc["exit_code"]


def register(sub: argparse._SubParsersAction) -> None:
    kpi = sub.add_parser("kpi", help="boot KPIs: collect, run N boots, judge against the manifest, report",
                         description=__doc__.splitlines()[0])
    ks = kpi.add_subparsers(dest="kpi_cmd", required=True, metavar="ACTION")

    p = ks.add_parser("collect", help="collect the current boot (or the journal's past boots) of a target",
                      description="Read systemd's phase timestamps and the units' timestamps (one GetAll per "
                                  "object) and print the phases exactly as systemd-analyze time computes them, "
                                  "plus the milestones, each with its state and source.")
    _target_args(p, journal=True)
    p.add_argument("--manifest", metavar="YAML", help="read the units its KPIs and containers name")
    p.add_argument("--unit", action="append", metavar="UNIT", help="another unit to read (repeatable)")
    p.add_argument("--history", action="store_true", help="every past boot from the target's journal")
    p.add_argument("--recorded", metavar="PROPS", help="replay a recorded property set instead of a live target")
    p.add_argument("--record", metavar="PROPS", help="also write the raw property set read (a test fixture)")
    p.add_argument("--label", choices=("first", "cold", "warm"), help="label this boot")
    p.add_argument("-o", "--output", metavar="JSON", help="write the boot records (a collection) here")
    p.add_argument("--json", action="store_true", help="print the collection as JSON")
    p.set_defaults(func=_cmd_collect, recorded=None)

    p = ks.add_parser("run", help="boot the target N times, collect each boot, judge, write reports",
                      description="Boot N times (a disk under QEMU: a new VM per boot, cold; a rig: ssh reboot, warm; "
                                  "a container tree: nspawn), collect each finished boot, judge the manifest's "
                                  "budgets and write OUT/kpi.json, kpi.junit.xml, kpi.html, kpi.md.")
    p.add_argument("--manifest", required=True, metavar="YAML", help="the budgets (kpis:, containers' deadline_ms)")
    p.add_argument("--times", type=int, default=3, metavar="N", help="number of boots (default 3)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="where the reports go")
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--disk", metavar="DISK", help="a disk (bootimg disk) booted under QEMU by UEFI, a new VM per boot")
    g.add_argument("--ssh", metavar="HOST", help="a rig over ssh, rebooted with systemctl reboot")
    g.add_argument("--container-root", metavar="DIR", help="a root tree booted with systemd-nspawn")
    p.add_argument("--ssh-config", metavar="FILE", help="ssh config file (with --ssh)")
    p.add_argument("--port", type=int, metavar="N", help="ssh port (with --ssh)")
    from ..vm.commands import add_machine_arguments

    add_machine_arguments(p)
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per boot, seconds (default 600)")
    p.add_argument("--serial-logs", action="store_true", help="keep each boot's console in OUT/serial/")
    p.add_argument("--via", choices=("auto", "pystemd", "busctl"), default="auto", help="data path (default auto)")
    p.set_defaults(func=_cmd_run)

    p = ks.add_parser("report", help="judge collected boots against the budgets; write JSON, JUnit, HTML, Markdown",
                      description="Judge the boots of collections or reports against the manifest's budgets "
                                  "(or the budgets a report carries) and render the reports.")
    p.add_argument("inputs", nargs="+", metavar="JSON", help="collections (kpi collect -o) or reports")
    p.add_argument("--manifest", metavar="YAML", help="the budgets (default: those in the input report)")
    p.add_argument("--exclude-label", action="append", choices=("first", "cold", "warm"),
                   help="leave out boots with this label (repeatable), e.g. first")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="write kpi.json, kpi.junit.xml, kpi.html, kpi.md here")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--junit", metavar="FILE")
    p.add_argument("--html", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    p.set_defaults(func=_cmd_report)

    p = ks.add_parser("compare", help="compare a KPI report against a baseline report",
                      description="Deltas of each KPI's judged statistic; a regression is over BOTH the "
                                  "relative and the absolute threshold. Exit 1 on a regression.")
    p.add_argument("current", metavar="CURRENT.json")
    p.add_argument("baseline", metavar="BASELINE.json")
    p.add_argument("--rel", type=float, default=0.10, metavar="FRACTION", help="relative threshold (default 0.10)")
    p.add_argument("--abs-ms", type=float, default=50.0, metavar="MS", help="absolute threshold (default 50)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    p.set_defaults(func=_cmd_compare)
