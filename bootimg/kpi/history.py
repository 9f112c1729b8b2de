"""Past boots from the journal: one record per ``_BOOT_ID``, on the target or from a journal
directory pulled off a board (``journalctl -D DIR``).

Sources, all structured fields (never message text):

* "Startup finished" (``MESSAGE_ID=b07a249cd024414a82dd00cd181378ff``; a container's or user
  manager's: ``eed00a68ffd84e31882105fd973abdd1``): FIRMWARE_USEC, LOADER_USEC, KERNEL_USEC,
  INITRD_USEC, USERSPACE_USEC as PID 1 computed them at the end of the boot
  (manager_notify_finished()). They give back the Manager timestamps exactly:
  InitRD = KERNEL_USEC (when INITRD_USEC is there), Userspace = KERNEL_USEC + INITRD_USEC,
  Finish = Userspace + USERSPACE_USEC.
* Unit starting (``MESSAGE_ID=7d4958e842da4a758f6c1cdc7b36dcc5``) of ``bootimg-root.service``: when
  the initramfs hook started, so that its own time (``root_hook``: started to done) is known.
* Job done (``MESSAGE_ID=39f53479d3a045ac8e11786248231fbf``, JOB_TYPE=start, JOB_RESULT=done):
  ``__MONOTONIC_TIMESTAMP`` of the message is when a unit became active (logged right after
  the state change; microseconds later than ActiveEnterTimestamp). The initrd's messages are
  in the same boot's journal, so the verified root's mount time survives switch-root here even
  when the unit itself is gone from the manager.

Boots without a "Startup finished" record (still booting, crashed) give records whose finish
is ``not_reached``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import BootimgError
from .collect import ROOT_UNIT, record_from_properties, units_to_read
from .model import BootRecord, Value

STARTUP_FINISHED = "b07a249cd024414a82dd00cd181378ff"
USER_STARTUP_FINISHED = "eed00a68ffd84e31882105fd973abdd1"
JOB_DONE = "39f53479d3a045ac8e11786248231fbf"
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
DEFAULT_TARGETS = ("graphical.target", "multi-user.target")

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def _journal(run: Runner, base: Sequence[str], matches: Sequence[str], what: str) -> list[dict[str, Any]]:
    proc = run([*base, "--no-pager", "-o", "json", "--output-fields=" + ",".join(
        ("MESSAGE_ID", "_BOOT_ID", "_PID", "UNIT", "JOB_TYPE", "JOB_RESULT", "FIRMWARE_USEC", "LOADER_USEC",
         "KERNEL_USEC", "INITRD_USEC", "USERSPACE_USEC", "__MONOTONIC_TIMESTAMP", "__REALTIME_TIMESTAMP")), *matches])
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and proc.stdout.strip()):
        raise BootimgError(f"{what}: journalctl failed: {(proc.stderr or '').strip().splitlines()[-1:] or ['?']}")
    out = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _int(entry: dict[str, Any], key: str) -> int:
    try:
        return int(entry.get(key, 0))
    except (TypeError, ValueError):
        return 0


def manager_from_startup(entry: dict[str, Any]) -> dict[str, Any]:
    """The Manager timestamps a "Startup finished" record stands for."""
    mono = _int(entry, "__MONOTONIC_TIMESTAMP")
    if entry.get("MESSAGE_ID") == USER_STARTUP_FINISHED:
        userspace = _int(entry, "USERSPACE_USEC")
        # A container: its clock is the host's; Userspace/Finish are only known relative to the message.
        return {"UserspaceTimestampMonotonic": mono - userspace, "FinishTimestampMonotonic": mono,
                "SecurityStartTimestampMonotonic": 0}
    kernel, initrd = _int(entry, "KERNEL_USEC"), _int(entry, "INITRD_USEC")
    loader, firmware = _int(entry, "LOADER_USEC"), _int(entry, "FIRMWARE_USEC")
    userspace = kernel + initrd
    return {
        "FirmwareTimestampMonotonic": firmware + loader if firmware else 0,
        "LoaderTimestampMonotonic": loader,
        "InitRDTimestampMonotonic": kernel if "INITRD_USEC" in entry else 0,
        "UserspaceTimestampMonotonic": userspace,
        "FinishTimestampMonotonic": userspace + _int(entry, "USERSPACE_USEC"),
        # Not in the journal; "set" marks a real (non-container) boot, as in acquire_boot_times().
        "SecurityStartTimestampMonotonic": 1,
    }


def history(run: Runner, *, directory: str | None = None, units: Iterable[str] = (),
            containers: Sequence[tuple[str, str]] = (), source: str = "journal") -> list[BootRecord]:
    """Every boot the journal knows, oldest first. ``run`` runs journalctl (locally or on the
    target); ``directory``: a journal directory (``journalctl -D``) instead of the system journal."""
    base = ["journalctl"] + (["-D", str(directory)] if directory else [])
    where = f"journal -D {directory}" if directory else source
    if directory and not Path(directory).is_dir():
        raise BootimgError("not a directory", file=str(directory))
    want = units_to_read([*units, *(u for _, u in containers)])
    starts = _journal(run, base, [f"MESSAGE_ID={STARTUP_FINISHED}", f"MESSAGE_ID={USER_STARTUP_FINISHED}"], where)
    jobs = _journal(run, base, [f"MESSAGE_ID={JOB_DONE}", "JOB_TYPE=start", "JOB_RESULT=done"], where)
    hook_starts: dict[str, int] = {}
    for e in _journal(run, base, [f"MESSAGE_ID={UNIT_STARTING}", f"UNIT={ROOT_UNIT}"], where):
        if e.get("_BOOT_ID"):
            hook_starts.setdefault(e["_BOOT_ID"], _int(e, "__MONOTONIC_TIMESTAMP"))
    by_boot_start: dict[str, dict[str, Any]] = {}
    first_seen: dict[str, int] = {}
    for e in starts:
        if e.get("_PID") not in (None, "1") and e.get("MESSAGE_ID") == USER_STARTUP_FINISHED:
            continue  # a user manager's, not PID 1's
        bid = e.get("_BOOT_ID")
        if bid:
            by_boot_start[bid] = e  # the last one wins (a daemon-reexec logs nothing; soft reboots do)
            first_seen.setdefault(bid, _int(e, "__REALTIME_TIMESTAMP"))
    done: dict[str, dict[str, int]] = defaultdict(dict)
    for e in jobs:
        bid, unit = e.get("_BOOT_ID"), e.get("UNIT")
        if not bid or not unit:
            continue
        first_seen.setdefault(bid, _int(e, "__REALTIME_TIMESTAMP"))
        done[bid].setdefault(unit, _int(e, "__MONOTONIC_TIMESTAMP"))  # first activation in that boot
    records = []
    for bid in sorted(first_seen, key=lambda b: first_seen[b]):
        start = by_boot_start.get(bid)
        manager = manager_from_startup(start) if start else {"SecurityStartTimestampMonotonic": 1}
        unit_props: dict[str, dict[str, Any]] = {}
        for name in want:
            real = name
            if name == "default.target":
                real = next((t for t in DEFAULT_TARGETS if t in done[bid]), "multi-user.target")
            mono = done[bid].get(real)
            unit_props[name] = ({"Id": real, "LoadState": "loaded", "ActiveState": "active", "SubState": "active",
                                 "ActiveEnterTimestampMonotonic": mono} if mono is not None else
                                {"Id": real, "LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead"})
        rec = record_from_properties(manager, unit_props, {"/proc/sys/kernel/random/boot_id": bid},
                                     source=where, containers=containers)
        rec = _journal_provenance(rec, start is not None)
        if bid in hook_starts:
            rec.milestones["root_hook_start"] = Value(
                "ok", hook_starts[bid], rec.clock, f"journal:unit-starting {ROOT_UNIT} __MONOTONIC_TIMESTAMP")
        records.append(rec)
    return records


def _journal_provenance(rec: BootRecord, finished: bool) -> BootRecord:
    """Sources say "journal:" and which record the number came from."""
    def fix(v: Value) -> Value:
        src = v.source.replace("dbus:Manager.", "journal:startup-finished(") \
                      .replace("dbus:", "journal:job-done ")
        if src.startswith("journal:startup-finished("):
            src += ")"
        if src.startswith("journal:job-done "):
            src = src.replace(".ActiveEnterTimestampMonotonic", " __MONOTONIC_TIMESTAMP")
        note = v.note if finished or v.state == "ok" else (v.note + "; no Startup finished record for this boot").lstrip("; ")
        return dataclasses.replace(v, source=src, note=note)
    rec.phases = {k: fix(v) for k, v in rec.phases.items()}
    rec.milestones = {k: fix(v) for k, v in rec.milestones.items()}
    if not finished:
        rec.analyze_time = None
    return rec


def with_journal(record: BootRecord, run: Runner) -> BootRecord:
    """``record`` (collected live, over D-Bus) completed from the same boot's journal: the exact
    time the verified root was mounted and the hook's start, which the manager no longer knows
    after switch-root (its initrd units are gone). Unchanged when the journal has neither."""
    try:
        past = history(run, units=[ROOT_UNIT])
    except BootimgError:
        return record
    this = next((r for r in past if r.boot_id == record.boot_id), None)
    if this is None:
        return record
    for name in ("root_mounted", "root_hook_start"):
        v = this.milestones.get(name)
        if v is not None and v.state == "ok" and ROOT_UNIT in v.source:
            record.milestones[name] = v
    return record


def local_runner(argv: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise BootimgError(f"{argv[0]} not found (Debian: systemd)") from None
