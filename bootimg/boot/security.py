"""The build's sandbox report: how exposed each container unit is, by systemd's own measure.

``systemd-analyze security --offline=true`` rates a unit file without a running systemd, on
the scale systemd's own units are judged by: 0.0 (nothing exposed) to 10.0, with a word for
the band (SAFE < 1.0 <= OK < 5.0 <= MEDIUM < 7.5 <= EXPOSED < 9.0 <= UNSAFE < 10.0 <=
DANGEROUS). The build runs the build host's systemd-analyze on the generated NAME.service
files (laid out in a scratch ``--root``) and writes ``OUT/sandbox.json``: for every unit its
exposure and band, the settings that still count against it, and what the manifest's
``sandbox:`` relaxed and why, the record a security review reads. Without systemd-analyze on
the build host the report says so plainly and holds no scores; the build does not fail.

The scores depend on the build host's systemd (its version is in the report) and nothing
else, so the same inputs on the same host give the same report; release.json does not hold
them (the release's bytes do not depend on the build host).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..manifest.model import Manifest
from ..manifest.reserved import UNIT_DIR, service_unit
from ..release import layout
from ..release.build import BuildContext, Report
from . import sandbox

REPORT_FORMAT = "bootimg-sandbox-report/1"
COMMAND = "systemd-analyze security --offline=true"
_OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d) (\w+)")
_ENV = {"SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


class ScoringError(Exception):
    """systemd-analyze ran but gave no score (its message, one line)."""


def find_tool() -> str | None:
    return shutil.which("systemd-analyze")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, **_ENV},
                          stdin=subprocess.DEVNULL)


def tool_version(tool: str) -> str:
    """The first line of ``systemd-analyze --version``, e.g. 'systemd 252 (252.39-1~deb12u2)'."""
    out = _run([tool, "--version"]).stdout.splitlines()
    return out[0].strip() if out else "systemd (version unknown)"


def score(files: Mapping[str, bytes], units: list[str], tool: str) -> dict[str, dict]:
    """{unit: {"exposure", "level", "exposed"}} for ``units`` among ``files`` ({absolute path in
    the root: content}): the overall exposure and band, and every setting that adds to it
    (systemd's name for it, its share of the exposure, its description), largest first."""
    with tempfile.TemporaryDirectory(prefix="bootimg-security-") as tmp:
        for path, data in files.items():
            dest = Path(tmp) / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        base = [tool, "security", "--offline=true", f"--root={tmp}", "--no-pager"]
        text = _run(base + units)
        overall = {m.group(1): (float(m.group(2)), m.group(3)) for m in _OVERALL.finditer(text.stdout)}
        missing = [u for u in units if u not in overall]
        if missing:
            why = " ".join((text.stderr or text.stdout).split())[:300] or f"exit status {text.returncode}"
            raise ScoringError(f"no score for {', '.join(missing)}: {why}")
        tables = _json_arrays(_run(base + ["--json=short"] + units).stdout)
    out = {}
    for i, unit in enumerate(units):
        items = tables[i] if len(tables) == len(units) else []
        exposed = sorted(({"setting": x["name"], "exposure": float(x["exposure"]), "description": x["description"]}
                          for x in items if x.get("exposure")), key=lambda x: (-x["exposure"], x["setting"]))
        out[unit] = {"exposure": overall[unit][0], "level": overall[unit][1], "exposed": exposed}
    return out


def _json_arrays(text: str) -> list[list[dict]]:
    """systemd-analyze --json prints one array per unit, back to back."""
    decoder = json.JSONDecoder()
    arrays, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return arrays
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return arrays
        arrays.append(value)


def sandbox_report(manifest: Manifest, files: Mapping[str, bytes], tool: str | None) -> Report:
    """OUT/sandbox.json and its summary lines, for the container units among ``files``."""
    units = [service_unit(c.name) for c in manifest.containers]
    entries: dict[str, dict] = {}
    for c in manifest.containers:
        entry: dict = {"container": c.name}
        if c.sandbox is not None:
            entry["relaxed"] = sandbox.relaxations(c)
            entry["reason"] = c.sandbox.reason
        entries[service_unit(c.name)] = entry
    data: dict = {"format": REPORT_FORMAT, "tool": COMMAND, "units": entries}
    summary: list[str] = []
    if tool is None:
        data.update(scored=False, systemd=None, note="systemd-analyze is not on the build host's PATH: not scored")
        summary.append(f"sandbox: NOT SCORED: systemd-analyze is not on this build host's PATH "
                       f"(install systemd to score the units); {layout.SANDBOX_JSON} lists the relaxations")
        return Report(layout.SANDBOX_JSON, data, tuple(summary))
    data["systemd"] = tool_version(tool)
    unit_files = {p: files[p] for p in files if p.startswith(UNIT_DIR + "/")}
    try:
        scores = score(unit_files, units, tool)
    except (ScoringError, OSError, subprocess.SubprocessError) as err:
        data.update(scored=False, note=f"{COMMAND} failed: {err}")
        summary.append(f"sandbox: NOT SCORED: {COMMAND} failed: {err}")
        return Report(layout.SANDBOX_JSON, data, tuple(summary))
    data["scored"] = True
    for unit in units:
        entries[unit].update(scores[unit])
    summary.append(f"sandbox exposure ({COMMAND}, {data['systemd']}; 0 = none, 10 = all), details in "
                   f"{layout.SANDBOX_JSON}:")
    for c in manifest.containers:
        entry = entries[service_unit(c.name)]
        relaxed = "; ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                            for k, v in entry.get("relaxed", {}).items())
        summary.append(f"  {service_unit(c.name):<28} {entry['exposure']:>4} {entry['level']:<9}"
                       f" {'relaxed: ' + relaxed if relaxed else ''}".rstrip())
    return Report(layout.SANDBOX_JSON, data, tuple(summary))


def container_sandboxes(ctx: BuildContext) -> Report | None:
    """Release reporter: the sandbox report of the manifest's container units (none: no report)."""
    if not ctx.manifest.containers:
        return None
    files = {path: item.content for path, item in ctx.injected.items()}
    return sandbox_report(ctx.manifest, files, find_tool())
