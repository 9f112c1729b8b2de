"""One boot's record from the manager's properties, computed exactly as ``systemd-analyze time`` does.

``acquire_boot_times()`` of systemd's src/analyze/analyze-time-data.c reads the Manager's
timestamps with one GetAll; ``pretty_boot_time()`` turns them into the "Startup finished in"
line. This module does the same arithmetic, but in signed integers: where systemd would wrap
(the "584542y" of systemd#17191) the value is ``implausible``, and where a timestamp is 0 the
phase is ``not_measurable`` or ``not_reached`` with a reason, never a silent zero.

* System boot (``SecurityStartTimestampMonotonic`` set): kernel_done = InitRD or Userspace.
* Container (no security start): every timestamp is rebased to Userspace; firmware, loader,
  kernel and initrd are not measurable; there is no total.
* Soft reboot (``SoftRebootsCount`` > 0, systemd >= 256): firmware..initrd belong to an earlier
  boot and are not measurable.

``collect(transport, units)`` reads everything in one bulk round; ``record_from_properties``
is the pure part (tests feed it recorded property sets).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Iterable, Sequence

from .model import ABSURD_USEC, BootRecord, UnitRecord, Value, not_measurable, not_reached, ok, timestamp_is_set
from .transport import MANAGER_PATH, TARGET_FILES, Transport, TransportError, unit_path

# Units every record reads for its milestones (besides the manifest's containers and KPI units).
ROOT_UNIT = "bootimg-root.service"  # the initrd hook that mounts the verified root
MILESTONE_UNITS = ("default.target", ROOT_UNIT, "sysroot.mount", "initrd-root-fs.target",
                   "initrd-switch-root.service", "initrd-switch-root.target")

MANAGER_KEEP = (
    "Version", "Virtualization", "Architecture", "Features", "SoftRebootsCount",
    "FirmwareTimestampMonotonic", "LoaderTimestampMonotonic", "KernelTimestamp", "InitRDTimestampMonotonic",
    "UserspaceTimestampMonotonic", "FinishTimestampMonotonic", "SecurityStartTimestampMonotonic",
    "SecurityFinishTimestampMonotonic", "GeneratorsStartTimestampMonotonic", "GeneratorsFinishTimestampMonotonic",
    "UnitsLoadStartTimestampMonotonic", "UnitsLoadFinishTimestampMonotonic",
    "InitRDSecurityStartTimestampMonotonic", "InitRDSecurityFinishTimestampMonotonic",
    "InitRDGeneratorsStartTimestampMonotonic", "InitRDGeneratorsFinishTimestampMonotonic",
    "InitRDUnitsLoadStartTimestampMonotonic", "InitRDUnitsLoadFinishTimestampMonotonic",
    "SoftRebootStartTimestampMonotonic", "ShutdownStartTimestampMonotonic", "NJobs",
)
UNIT_KEEP = (
    "Id", "Names", "LoadState", "ActiveState", "SubState", "Result", "Type", "NotifyAccess",
    "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic", "ActiveExitTimestampMonotonic",
    "InactiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic", "ConditionResult", "After",
)

MESSAGE_NOT_FINISHED = "boot not finished (FinishTimestampMonotonic=0: jobs still running)"


def trim(props: dict[str, Any], keep: Iterable[str]) -> dict[str, Any]:
    return {k: props[k] for k in keep if k in props}


def format_timespan(usec: int, accuracy: int = 1000) -> str:
    """systemd's format_timespan() (src/basic/time-util.c): truncating, like `systemd-analyze time`."""
    table = (("y", 31557600 * 10**6), ("month", 2629800 * 10**6), ("w", 7 * 86400 * 10**6),
             ("d", 86400 * 10**6), ("h", 3600 * 10**6), ("min", 60 * 10**6), ("s", 10**6), ("ms", 1000), ("us", 1))
    if usec >= 2**64 - 1:
        return "infinity"
    if usec <= 0:
        return "0"
    t, out, something = usec, [], False
    for suffix, unit in table:
        if t <= 0 or (t < accuracy and something):
            break
        if t < unit:
            continue
        a, b = divmod(t, unit)
        done = False
        if t < 60 * 10**6 and b > 0:
            j, cc = 0, unit
            while cc > 1:
                j, cc = j + 1, cc // 10
            cc = accuracy
            while cc > 1:
                b, j, cc = b // 10, j - 1, cc // 10
            if j > 0:
                out.append(f"{a}.{b:0{j}d}{suffix}")
                t, done = 0, True
        if not done:
            out.append(f"{a}{suffix}")
            t = b
        something = True
    return " ".join(out)


def _t(props: dict[str, Any], key: str) -> int:
    v = props.get(key, 0)
    return int(v) if isinstance(v, (int, float)) else 0


def phases_from_manager(m: dict[str, Any]) -> tuple[dict[str, Value], str, int | None]:
    """The phases of ``systemd-analyze time`` and the record's clock ("target" or "host").
    Returns (phases, clock, userspace monotonic)."""
    src = "dbus:Manager."
    firmware, loader = _t(m, "FirmwareTimestampMonotonic"), _t(m, "LoaderTimestampMonotonic")
    initrd, userspace = _t(m, "InitRDTimestampMonotonic"), _t(m, "UserspaceTimestampMonotonic")
    finish, security = _t(m, "FinishTimestampMonotonic"), _t(m, "SecurityStartTimestampMonotonic")
    soft = _t(m, "SoftRebootsCount")
    p: dict[str, Value] = {}
    container = not timestamp_is_set(security) and not soft
    clock = "host" if container else "target"
    if container:
        why = "container: no firmware, loader, kernel or initrd of its own (Manager.SecurityStartTimestampMonotonic=0)"
        for name in ("firmware", "loader", "kernel", "initrd", "total"):
            p[name] = not_measurable("span", src + "SecurityStartTimestampMonotonic", why)
    elif soft:
        why = f"soft reboot (SoftRebootsCount={soft}): these phases belong to an earlier boot"
        for name in ("firmware", "loader", "kernel", "initrd", "total"):
            p[name] = not_measurable("span", src + "SoftRebootsCount", why)
    else:
        no_efi = "no EFI/ACPI FPDT boot timestamps on this platform"
        if timestamp_is_set(firmware):
            p["firmware"] = ok(firmware - loader, "span", src + "FirmwareTimestampMonotonic - LoaderTimestampMonotonic")
        else:
            p["firmware"] = not_measurable("span", src + "FirmwareTimestampMonotonic", no_efi + " (FirmwareTimestamp=0)")
        if timestamp_is_set(loader):
            p["loader"] = ok(loader, "span", src + "LoaderTimestampMonotonic")
        else:
            p["loader"] = not_measurable("span", src + "LoaderTimestampMonotonic", no_efi + " (LoaderTimestamp=0)")
        kernel_done = initrd if initrd > 0 else userspace
        if timestamp_is_set(kernel_done):
            what = "InitRDTimestampMonotonic" if initrd > 0 else "UserspaceTimestampMonotonic"
            p["kernel"] = ok(kernel_done, "span", src + what,
                             "" if initrd > 0 else "no systemd in the initrd: any initrd time is counted here")
        else:
            p["kernel"] = not_measurable("span", src + "UserspaceTimestampMonotonic", "no userspace timestamp")
        if timestamp_is_set(initrd):
            p["initrd"] = ok(userspace - initrd, "span", src + "UserspaceTimestampMonotonic - InitRDTimestampMonotonic")
        else:
            p["initrd"] = not_measurable("span", src + "InitRDTimestampMonotonic",
                                         "no systemd initrd (InitRDTimestamp=0): initrd time, if any, is in 'kernel'")
        if timestamp_is_set(finish) and timestamp_is_set(kernel_done):
            p["total"] = ok(firmware + finish, "span", src + "FirmwareTimestampMonotonic + FinishTimestampMonotonic")
        elif not timestamp_is_set(finish):
            p["total"] = not_reached("span", src + "FinishTimestampMonotonic", MESSAGE_NOT_FINISHED)
        else:
            p["total"] = not_measurable("span", src + "FinishTimestampMonotonic", "no kernel time")
    if timestamp_is_set(finish):
        p["userspace"] = ok(finish - userspace, "span", src + "FinishTimestampMonotonic - UserspaceTimestampMonotonic")
    else:
        p["userspace"] = not_reached("span", src + "FinishTimestampMonotonic", MESSAGE_NOT_FINISHED)
    order = ("firmware", "loader", "kernel", "initrd", "userspace", "total")
    return {k: p[k] for k in order}, clock, (userspace if timestamp_is_set(userspace) else None)


def analyze_time_text(m: dict[str, Any], default_target: dict[str, Any] | None) -> str | None:
    """The text `systemd-analyze time` prints for these properties (None: it would refuse,
    "Bootup is not yet finished"). Same arithmetic as pretty_boot_time(), including wrap-around."""
    wrap = 2**64
    firmware, loader = _t(m, "FirmwareTimestampMonotonic"), _t(m, "LoaderTimestampMonotonic")
    initrd, userspace = _t(m, "InitRDTimestampMonotonic"), _t(m, "UserspaceTimestampMonotonic")
    finish, security = _t(m, "FinishTimestampMonotonic"), _t(m, "SecurityStartTimestampMonotonic")
    soft_start = _t(m, "SoftRebootStartTimestampMonotonic")
    if finish <= 0:
        return None
    kernel_done, reverse = 0, 0
    if timestamp_is_set(soft_start):
        firmware = loader = initrd = 0
        reverse = soft_start
        finish, userspace = finish - reverse, userspace - reverse
    elif timestamp_is_set(security):
        kernel_done = initrd if initrd > 0 else userspace
    else:
        reverse = userspace
        firmware = loader = initrd = userspace = 0
        finish -= reverse
    fmt = lambda v: format_timespan(v % wrap)  # noqa: E731  (unsigned arithmetic, as in C)
    text = "Startup finished in "
    if timestamp_is_set(firmware):
        text += fmt(firmware - loader) + " (firmware) + "
    if timestamp_is_set(loader):
        text += fmt(loader) + " (loader) + "
    if timestamp_is_set(kernel_done):
        text += fmt(kernel_done) + " (kernel) + "
    if timestamp_is_set(initrd):
        text += fmt(userspace - initrd) + " (initrd) + "
    if timestamp_is_set(soft_start):
        text += fmt(userspace) + " (soft reboot) + "
    text += fmt(finish - userspace) + " (userspace) "
    if timestamp_is_set(kernel_done):
        text += "= " + fmt(firmware + finish) + " "
    if default_target is not None:
        uid = default_target.get("Id") or "default.target"
        activated = _t(default_target, "ActiveEnterTimestampMonotonic")
        if timestamp_is_set(activated):
            if timestamp_is_set(soft_start) and timestamp_is_set(userspace):
                base = userspace + reverse
            else:
                base = userspace if timestamp_is_set(userspace) else reverse
            text += f"\n{uid} reached after {fmt(activated - base)} in userspace."
        elif activated == 0:
            text += f"\n{uid} was never reached."
    return text


def unit_record(name: str, props: dict[str, Any]) -> UnitRecord:
    cond = props.get("ConditionResult")
    return UnitRecord(
        name=name, id=str(props.get("Id") or name), load_state=str(props.get("LoadState", "")),
        active_state=str(props.get("ActiveState", "")), sub_state=str(props.get("SubState", "")),
        result=props.get("Result"), type=props.get("Type"),
        activating_usec=_t(props, "InactiveExitTimestampMonotonic"),
        active_usec=_t(props, "ActiveEnterTimestampMonotonic"),
        exec_main_start_usec=_t(props, "ExecMainStartTimestampMonotonic"),
        deactivated_usec=_t(props, "InactiveEnterTimestampMonotonic"),
        condition_result=None if cond is None else bool(cond))


def unit_milestone(u: UnitRecord, clock: str, *, before: int | None = None, journal: bool = False) -> Value:
    """When unit ``u`` became active (ActiveEnterTimestampMonotonic), with an explicit state.
    ``before``: the timestamp must be earlier than this (an initrd unit measured in the initrd).
    ``journal``: the record came from the journal (the job-done message's timestamp)."""
    src = (f"journal:job-done {u.name} __MONOTONIC_TIMESTAMP" if journal
           else f"dbus:{u.name}.ActiveEnterTimestampMonotonic")
    if u.load_state in ("not-found", "") and u.active_usec == 0:
        return not_reached(clock, src, f"{u.name} is not loaded (LoadState={u.load_state or 'unknown'})")
    if not timestamp_is_set(u.active_usec):
        state = f"ActiveState={u.active_state}" + (f", Result={u.result}" if u.result else "")
        if u.condition_result is False:
            state += ", a start condition failed"
        return not_reached(clock, src, f"{u.name} never became active ({state})")
    if before is not None and u.active_usec >= before:
        return Value("implausible", u.active_usec, clock, src,
                     f"{u.name} became active at {u.active_usec} us, not before userspace start ({before} us): "
                     "a later activation replaced the initrd's timestamp")
    note = f"Type={u.type}" if u.type else ""
    if u.activating_usec and u.active_usec < u.activating_usec:
        return Value("implausible", u.active_usec, clock, src,
                     f"active ({u.active_usec} us) before activating ({u.activating_usec} us)")
    if u.active_usec > ABSURD_USEC and clock == "target":
        return ok(u.active_usec, clock, src, note)  # ok() flags it as absurd
    return Value("ok", u.active_usec, clock, src, note)


def milestones(m: dict[str, Any], units: dict[str, UnitRecord], clock: str) -> dict[str, Value]:
    src = "dbus:Manager."
    initrd, userspace = _t(m, "InitRDTimestampMonotonic"), _t(m, "UserspaceTimestampMonotonic")
    finish = _t(m, "FinishTimestampMonotonic")
    container = clock == "host"
    out: dict[str, Value] = {}
    # initrd start: the kernel handed over to systemd in the initrd.
    if container:
        out["initrd_start"] = not_measurable(clock, src + "InitRDTimestampMonotonic", "container: no initrd")
    elif timestamp_is_set(initrd):
        out["initrd_start"] = ok(initrd, clock, src + "InitRDTimestampMonotonic")
    else:
        out["initrd_start"] = not_measurable(clock, src + "InitRDTimestampMonotonic",
                                             "no systemd in the initrd (InitRDTimestamp=0)")
    # root mounted: the verified root (bootimg-root.service), else the initrd's sysroot.mount.
    if container:
        out["root_mounted"] = not_measurable(clock, "container", "container: its root is mounted by the host")
    elif timestamp_is_set(initrd):
        candidates = [units[n] for n in (ROOT_UNIT, "sysroot.mount", "initrd-root-fs.target") if n in units]
        chosen = None
        for u in candidates:
            if u.load_state not in ("not-found", "") or u.active_usec:
                v = unit_milestone(u, clock, before=userspace or None)
                if v.state == "ok" or (chosen is None and v.state != "not_reached"):
                    chosen = v
                if v.state == "ok":
                    break
        if chosen is not None and chosen.ok and chosen.source.startswith("dbus:initrd-root-fs.target"):
            # systemd garbage-collects the initrd's sysroot.mount and bootimg-root.service after
            # switch-root; the target ordered after them is what the manager still knows.
            chosen = dataclasses.replace(chosen, note="upper bound: initrd-root-fs.target is reached once the root "
                                                      "is mounted (the mount units are gone after switch-root; "
                                                      "the journal has them: kpi collect --history)")
        out["root_mounted"] = chosen or not_reached(
            clock, f"dbus:{ROOT_UNIT}|sysroot.mount|initrd-root-fs.target",
            "none of bootimg-root.service, sysroot.mount, initrd-root-fs.target became active in the initrd")
    elif timestamp_is_set(userspace):
        out["root_mounted"] = ok(userspace, clock, src + "UserspaceTimestampMonotonic",
                                 "upper bound: no systemd initrd, the root was mounted before systemd started")
    else:
        out["root_mounted"] = not_reached(clock, src + "UserspaceTimestampMonotonic", "no userspace timestamp")
    # switch-root: systemd (re)started in the real root.
    if container:
        out["switch_root"] = not_measurable(clock, src + "UserspaceTimestampMonotonic", "container: no switch-root")
    elif timestamp_is_set(initrd):
        if timestamp_is_set(userspace):
            v = ok(userspace, clock, src + "UserspaceTimestampMonotonic")
            if v.ok and userspace < initrd:
                v = Value("implausible", userspace, clock, v.source, "userspace start before initrd start")
            out["switch_root"] = v
        else:
            out["switch_root"] = not_reached(clock, src + "UserspaceTimestampMonotonic", "the initrd never switched root")
    else:
        out["switch_root"] = not_measurable(clock, src + "InitRDTimestampMonotonic",
                                            "no systemd initrd: no switch-root to measure")
    # userspace start: systemd started in the real root (with or without an initrd).
    if container:
        out["userspace_start"] = Value("ok", userspace, clock, src + "UserspaceTimestampMonotonic",
                                       "container start on the host's clock") if timestamp_is_set(userspace) \
            else not_reached(clock, src + "UserspaceTimestampMonotonic", "no userspace timestamp")
    elif timestamp_is_set(userspace):
        out["userspace_start"] = ok(userspace, clock, src + "UserspaceTimestampMonotonic")
    else:
        out["userspace_start"] = not_reached(clock, src + "UserspaceTimestampMonotonic", "no userspace timestamp")
    # default target and boot finished.
    dt = units.get("default.target")
    out["default_target"] = (unit_milestone(dt, clock) if dt is not None
                             else not_reached(clock, "dbus:default.target", "default.target not read"))
    if timestamp_is_set(finish):
        out["boot_finished"] = ok(finish, clock, src + "FinishTimestampMonotonic") if clock == "target" \
            else Value("ok", finish, clock, src + "FinishTimestampMonotonic")
    else:
        out["boot_finished"] = not_reached(clock, src + "FinishTimestampMonotonic", MESSAGE_NOT_FINISHED)
    return out


def record_from_properties(manager: dict[str, Any], unit_props: dict[str, dict[str, Any]],
                           files: dict[str, str | None], *, source: str, label: str | None = None,
                           collected_at: str | None = None, collect_seconds: float | None = None,
                           containers: Sequence[tuple[str, str]] = ()) -> BootRecord:
    """The pure part of a collection: a BootRecord from a property set. ``containers``: (name,
    unit) of each boot-time container, each gets a ``container:NAME`` milestone (ready)."""
    phases, clock, userspace = phases_from_manager(manager)
    units = {name: unit_record(name, props) for name, props in unit_props.items()}
    ms = milestones(manager, units, clock)
    for cname, unit in containers:
        if unit in units:
            ms[f"container:{cname}"] = unit_milestone(units[unit], clock, journal=source.startswith("journal"))
    boot_id = (files.get("/proc/sys/kernel/random/boot_id") or "").strip().replace("-", "") or None
    booted_text = files.get("/run/bootimg/booted.json")
    booted: dict[str, Any] | None = None
    if booted_text:
        try:
            booted = json.loads(booted_text)
        except ValueError:
            booted = {"error": "unreadable /run/bootimg/booted.json", "text": booted_text[:200]}
    system = {
        "systemd_version": manager.get("Version"), "virtualization": manager.get("Virtualization") or None,
        "architecture": manager.get("Architecture"), "soft_reboots": manager.get("SoftRebootsCount"),
        "container": clock == "host", "systemd_initrd": timestamp_is_set(_t(manager, "InitRDTimestampMonotonic")),
        # A container's /proc/cmdline is the host's: not this system's.
        "kernel_cmdline": None if clock == "host" else ((files.get("/proc/cmdline") or "").strip() or None),
        "jobs_running": manager.get("NJobs"),
    }
    props = {"manager": trim(manager, MANAGER_KEEP),
             "units": {n: trim(p, UNIT_KEEP) for n, p in unit_props.items()}}
    return BootRecord(boot_id=boot_id, source=source, clock=clock, system=system, booted=booted, phases=phases,
                      milestones=ms, units=units, userspace_usec=userspace,
                      analyze_time=analyze_time_text(manager, unit_props.get("default.target")), label=label,
                      collected_at=collected_at, collect_seconds=collect_seconds, properties=props)


def units_to_read(extra: Iterable[str] = ()) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(MILESTONE_UNITS)
    for u in extra:
        seen.setdefault(u, None)
    return list(seen)


def collect(transport: Transport, units: Sequence[str] = (), *, label: str | None = None,
            containers: Sequence[tuple[str, str]] = ()) -> BootRecord:
    """Read the manager, the milestone units, ``units`` and the containers' units (one GetAll
    each, one connection) and the target's boot id, command line and /run/bootimg/booted.json."""
    names = units_to_read([*units, *(u for _, u in containers)])
    t0 = time.perf_counter()
    answers = transport.get_all_many([MANAGER_PATH] + [unit_path(u) for u in names])
    files = transport.read_files(TARGET_FILES)
    seconds = time.perf_counter() - t0
    rec = record_from_properties(
        answers[0], dict(zip(names, answers[1:])), files, source=transport.describe(), label=label,
        collected_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), collect_seconds=round(seconds, 4),
        containers=containers)
    entry = boot_entry(transport)
    if entry is not None:
        rec.system["boot_entry"] = entry
    return rec


# systemd-boot's EFI variables (vendor 4a67b082-...): which entry it booted, and with boot
# counting the entry file it counts on (its name carries the tries left and done); then the
# entry files on the ESP (mounted at /efi, /boot/efi or /boot), whose names say which entries
# are still being tried and which used up their tries (why another one booted).
_LOADER_VARS = ("LoaderEntrySelected", "LoaderBootCountPath")
_READ_LOADER_VARS = ("for v in " + " ".join(_LOADER_VARS) + "; do "
                     "f=/sys/firmware/efi/efivars/$v-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f; "
                     "[ -r \"$f\" ] && { printf '%s ' \"$v\"; od -An -v -tx1 \"$f\" | tr -d ' \\n'; echo; }; done; "
                     "for d in /efi /boot/efi /boot; do [ -d \"$d/loader/entries\" ] || continue; "
                     "for e in \"$d\"/loader/entries/*.conf; do [ -f \"$e\" ] && echo \"ENTRY ${e##*/}\"; done; break; done; true")
_COUNTER = re.compile(r"^(?P<id>.+?)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.(?:conf|efi)$")


def _counted(filename: str) -> dict[str, Any]:
    m = _COUNTER.match(filename)
    left = int(m.group("left")) if m and m.group("left") is not None else None
    done = int(m.group("done")) if m and m.group("done") is not None else None
    state = "good" if left is None else "bad" if left == 0 else "trying"
    return {"id": m.group("id") if m else filename, "file": filename, "tries_left": left, "tries_done": done,
            "state": state}


def parse_loader_vars(text: str) -> dict[str, Any] | None:
    """``NAME HEX`` lines of EFI variables (4 bytes of attributes, then UTF-16LE text) as the
    booted entry and its boot counters, and ``ENTRY FILE`` lines as the ESP's entries; None
    without systemd-boot."""
    values = {}
    entries = []
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name == "ENTRY" and rest:
            entries.append(_counted(rest))
        elif name in _LOADER_VARS and rest:
            try:
                values[name] = bytes.fromhex(rest)[4:].decode("utf-16-le").rstrip("\0")
            except (ValueError, UnicodeDecodeError):
                continue
    if not values:
        return None
    # LoaderEntrySelected is the entry's file name with its counter as it was at boot (systemd
    # 252) or the id without it (newer systemd-boot): "id" is the Boot Loader Specification id.
    selected = values.get("LoaderEntrySelected")
    out: dict[str, Any] = {"selected": selected, "id": _counted(selected)["id"] if selected else None,
                           "count_path": values.get("LoaderBootCountPath"), "tries_left": None, "tries_done": None}
    counted = _counted((out["count_path"] or "").replace("\\", "/").rsplit("/", 1)[-1])
    if out["count_path"]:
        out["tries_left"], out["tries_done"] = counted["tries_left"], counted["tries_done"]
    if entries:
        out["entries"] = sorted(entries, key=lambda e: e["file"])
    return out


def boot_entry(transport: Transport) -> dict[str, Any] | None:
    """The loader entry this boot came from (None: no systemd-boot, or the transport cannot run
    commands, e.g. a recorded property set)."""
    try:
        proc = transport.run(["sh", "-c", _READ_LOADER_VARS], timeout=30)
    except (TransportError, NotImplementedError):
        return None
    return parse_loader_vars(proc.stdout or "") if proc.returncode == 0 else None


def record_property_set(recorder: Any) -> dict[str, Any]:
    """A Recorder's answers trimmed to the properties the verifier uses (small test fixtures)."""
    data = recorder.dump()
    objs = {}
    for path, props in data["objects"].items():
        objs[path] = trim(props, MANAGER_KEEP if path == MANAGER_PATH else UNIT_KEEP)
    data["objects"] = objs
    return data
