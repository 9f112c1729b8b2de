"""KPI collection logic on property sets recorded from real systems (tests/data/kpi/*.json).

container-nspawn.json: systemd 252 booted with systemd-nspawn (the board's Debian root);
board-initrd.json: the QEMU board, dracut systemd initrd, plain ext4 root;
Each records what `systemd-analyze time` printed for the same boot: our arithmetic must give the
same text. Edge cases (no EFI, no initrd, not finished, negative deltas, soft reboot) are those
real sets with single properties changed, as the comments say.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bootimg.kpi.collect import analyze_time_text, collect, format_timespan, phases_from_manager, record_from_properties
from bootimg.kpi.model import BootRecord
from bootimg.kpi.transport import MANAGER_PATH, RecordedTransport, bus_label_escape, unit_path, unwrap_busctl

DATA = Path(__file__).parent / "data" / "kpi"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def replay(name: str, units=("ssh.service", "missing.service"), **kw) -> BootRecord:
    with RecordedTransport(DATA / name) as t:
        return collect(t, list(units), **kw)


def props(name: str) -> tuple[dict, dict, dict]:
    """(manager, {unit: props}, files) of a recorded set."""
    d = load(name)
    objs = d["objects"]
    units = {p["Id"] if p.get("Id") else k: p for k, p in objs.items() if k != MANAGER_PATH}
    by_name = {}
    for path, p in objs.items():
        if path == MANAGER_PATH:
            continue
        # the unit name that was asked for: default.target's Id is multi-user.target
        name_asked = "default.target" if path.endswith("/default_2etarget") else p.get("Id")
        by_name[name_asked] = p
    del units
    return copy.deepcopy(objs[MANAGER_PATH]), copy.deepcopy(by_name), dict(d.get("files", {}))


# -- systemd's formatting and escaping --------------------------------------------------------

@pytest.mark.parametrize("usec,text", [
    (0, "0"), (999, "999us"), (1000, "1ms"), (614_743, "614ms"), (1_000_000, "1s"), (1_234_567, "1.234s"),
    (1_200_000, "1.200s"), (59_999_999, "59.999s"), (61_500_000, "1min 1.500s"), (3_600_000_000, "1h"),
    (2**64 - 1, "infinity"),
])
def test_format_timespan_matches_systemd(usec, text):
    # systemd truncates to the accuracy (USEC_PER_MSEC), it does not round: 614.743 ms -> 614ms.
    # 61.5 s: minutes are not in dot notation, the rest is ("1min 1.500s").
    assert format_timespan(usec) == text


def test_bus_label_escape_matches_sd_bus():
    assert bus_label_escape("multi-user.target") == "multi_2duser_2etarget"
    assert bus_label_escape("sshd@1.service") == "sshd_401_2eservice"
    assert bus_label_escape("0day.service") == "_30day_2eservice"  # a leading digit is escaped
    assert unit_path("default.target") == "/org/freedesktop/systemd1/unit/default_2etarget"


def test_busctl_json_is_unwrapped_recursively():
    raw = {"Id": {"type": "s", "data": "x.service"}, "After": {"type": "as", "data": ["a", "b"]},
           "T": {"type": "t", "data": 5}}
    assert unwrap_busctl(raw) == {"Id": "x.service", "After": ["a", "b"], "T": 5}


# -- a container boot -------------------------------------------------------------------------

def test_container_reconciles_with_systemd_analyze():
    rec = replay("container-nspawn.json")
    assert rec.analyze_time is not None
    assert rec.analyze_time.rstrip() == load("container-nspawn.json")["systemd_analyze_time"].rstrip()
    assert rec.clock == "host" and rec.system["container"] is True
    assert rec.system["virtualization"] == "systemd-nspawn"
    assert rec.system["kernel_cmdline"] is None  # a container's /proc/cmdline is the host's


def test_container_phases_are_userspace_only_never_zero():
    rec = replay("container-nspawn.json")
    m, _, _ = props("container-nspawn.json")
    for name in ("firmware", "loader", "kernel", "initrd", "total"):
        assert rec.phases[name].state == "not_measurable", name
        assert rec.phases[name].usec is None
        assert "container" in rec.phases[name].note
    us = rec.phases["userspace"]
    assert us.state == "ok"
    assert us.usec == m["FinishTimestampMonotonic"] - m["UserspaceTimestampMonotonic"]


def test_container_milestones():
    rec = replay("container-nspawn.json")
    ms = rec.milestones
    for name in ("initrd_start", "root_mounted", "switch_root"):
        assert ms[name].state == "not_measurable", name
    m, units, _ = props("container-nspawn.json")
    assert ms["default_target"].state == "ok"
    assert ms["default_target"].usec == units["default.target"]["ActiveEnterTimestampMonotonic"]
    assert ms["default_target"].clock == "host"
    assert ms["boot_finished"].usec == m["FinishTimestampMonotonic"]
    assert ms["boot_finished"].source == "dbus:Manager.FinishTimestampMonotonic"


def test_units_states_and_readiness_semantics():
    rec = replay("container-nspawn.json", units=("ssh.service", "kpi-broken.service", "missing.service"))
    ssh = rec.units["ssh.service"]
    assert ssh.type == "notify" and ssh.active_state == "active"
    assert 0 < ssh.activating_usec < ssh.active_usec
    broken = rec.units["kpi-broken.service"]
    assert broken.active_state == "failed" and broken.result == "exit-code" and broken.active_usec == 0
    assert rec.units["missing.service"].load_state == "not-found"


def test_boot_id_and_no_booted_json():
    rec = replay("container-nspawn.json")
    assert rec.boot_id and len(rec.boot_id) == 32 and "-" not in rec.boot_id
    assert rec.booted is None and rec.image_digest is None


def test_not_finished_is_not_reached_and_analyze_refuses():
    m, units, files = props("container-nspawn.json")
    m["FinishTimestampMonotonic"] = 0  # a boot still running its jobs
    rec = record_from_properties(m, units, files, source="test")
    assert rec.phases["userspace"].state == "not_reached"
    assert rec.milestones["boot_finished"].state == "not_reached"
    assert "not finished" in rec.milestones["boot_finished"].note
    assert rec.analyze_time is None  # systemd-analyze: "Bootup is not yet finished"


def test_record_round_trips_through_json():
    rec = replay("container-nspawn.json", label="first")
    again = BootRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert again.to_dict() == rec.to_dict()


# -- system boots: with and without a systemd initrd (derived from the real sets) ------------

def system_props(initrd_usec: int = 2_354_000, userspace: int = 7_469_000, finish: int = 10_941_000):
    """A system boot's manager properties: the container's set with the timestamps of a real
    system boot (the numbers of a dracut boot of the board: kernel 2.354 s, initrd 5.115 s)."""
    m, units, files = props("container-nspawn.json")
    base = m["UserspaceTimestampMonotonic"]
    m.update({"SecurityStartTimestampMonotonic": 2_000_000, "InitRDTimestampMonotonic": initrd_usec,
              "UserspaceTimestampMonotonic": userspace, "FinishTimestampMonotonic": finish,
              "FirmwareTimestampMonotonic": 0, "LoaderTimestampMonotonic": 0, "Virtualization": "qemu"})
    for p in units.values():  # move the units onto the target's clock
        for k in ("InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic",
                  "InactiveEnterTimestampMonotonic", "ActiveExitTimestampMonotonic"):
            if p.get(k):
                p[k] = p[k] - base + userspace
    files["/proc/cmdline"] = "root=LABEL=board-root console=ttyS0"
    return m, units, files


def test_system_boot_with_systemd_initrd_no_efi():
    m, units, files = system_props()
    rec = record_from_properties(m, units, files, source="test")
    assert rec.clock == "target"
    assert rec.phases["firmware"].state == "not_measurable" and "EFI" in rec.phases["firmware"].note
    assert rec.phases["loader"].state == "not_measurable"
    assert rec.phases["kernel"].usec == 2_354_000
    assert rec.phases["initrd"].usec == 7_469_000 - 2_354_000
    assert rec.phases["userspace"].usec == 10_941_000 - 7_469_000
    assert rec.phases["total"].usec == 10_941_000
    assert rec.analyze_time.startswith(
        "Startup finished in 2.354s (kernel) + 5.115s (initrd) + 3.472s (userspace) = 10.941s \n")
    assert rec.milestones["initrd_start"].usec == 2_354_000
    assert rec.milestones["switch_root"].usec == 7_469_000
    assert rec.system["kernel_cmdline"] == "root=LABEL=board-root console=ttyS0"


def test_root_mounted_prefers_the_verified_root_unit_measured_in_the_initrd():
    m, units, files = system_props()
    units["sysroot.mount"] = {"Id": "sysroot.mount", "LoadState": "loaded", "ActiveState": "active",
                              "ActiveEnterTimestampMonotonic": 6_100_000, "InactiveExitTimestampMonotonic": 6_000_000}
    units["bootimg-root.service"] = {"Id": "bootimg-root.service", "LoadState": "loaded", "ActiveState": "inactive",
                                     "ActiveEnterTimestampMonotonic": 6_600_000,
                                     "InactiveExitTimestampMonotonic": 6_150_000, "Type": "oneshot"}
    rec = record_from_properties(m, units, files, source="test")
    v = rec.milestones["root_mounted"]
    assert (v.state, v.usec) == ("ok", 6_600_000)
    assert v.source == "dbus:bootimg-root.service.ActiveEnterTimestampMonotonic"
    # Without the hook's unit, the initrd's sysroot.mount.
    del units["bootimg-root.service"]
    v = record_from_properties(m, units, files, source="test").milestones["root_mounted"]
    assert (v.state, v.usec, v.source) == ("ok", 6_100_000, "dbus:sysroot.mount.ActiveEnterTimestampMonotonic")


def test_root_mounted_after_switch_root_is_implausible_not_silently_used():
    # After switch-root the moved physical root re-activates sysroot.mount: its ActiveEnter is
    # then later than userspace start and no longer the initrd's mount time.
    m, units, files = system_props()
    units["sysroot.mount"] = {"Id": "sysroot.mount", "LoadState": "loaded", "ActiveState": "active",
                              "ActiveEnterTimestampMonotonic": 8_000_000}
    v = record_from_properties(m, units, files, source="test").milestones["root_mounted"]
    assert v.state == "implausible" and "not before userspace start" in v.note


def test_root_mounted_not_reached_when_nothing_mounted_it():
    m, units, files = system_props()
    for n in ("sysroot.mount", "bootimg-root.service", "initrd-root-fs.target"):
        units[n] = {"Id": n, "LoadState": "not-found", "ActiveState": "inactive"}
    v = record_from_properties(m, units, files, source="test").milestones["root_mounted"]
    assert v.state == "not_reached"


def test_no_systemd_initrd():
    m, units, files = system_props(initrd_usec=0, userspace=3_687_216, finish=7_078_389)
    rec = record_from_properties(m, units, files, source="test")
    assert rec.phases["initrd"].state == "not_measurable"
    assert rec.phases["kernel"].usec == 3_687_216 and "initrd" in rec.phases["kernel"].note
    assert rec.milestones["initrd_start"].state == "not_measurable"
    assert rec.milestones["switch_root"].state == "not_measurable"
    rm = rec.milestones["root_mounted"]
    assert rm.state == "ok" and rm.usec == 3_687_216 and "upper bound" in rm.note
    assert rec.analyze_time.startswith("Startup finished in 3.687s (kernel) + 3.391s (userspace) = 7.078s")


def test_efi_firmware_and_loader():
    m, units, files = system_props()
    m["FirmwareTimestampMonotonic"], m["LoaderTimestampMonotonic"] = 3_000_000, 1_200_000
    rec = record_from_properties(m, units, files, source="test")
    assert rec.phases["firmware"].usec == 1_800_000 and rec.phases["loader"].usec == 1_200_000
    assert rec.phases["total"].usec == 3_000_000 + 10_941_000
    assert rec.analyze_time.startswith("Startup finished in 1.800s (firmware) + 1.200s (loader) + 2.354s (kernel)")


def test_negative_delta_is_implausible_where_systemd_analyze_wraps():
    # Userspace before the initrd start: systemd-analyze prints a wrapped "584542y ..." here.
    m, units, files = system_props(initrd_usec=8_000_000, userspace=7_469_000)
    rec = record_from_properties(m, units, files, source="test")
    assert rec.phases["initrd"].state == "implausible" and rec.phases["initrd"].usec == -531_000
    assert rec.milestones["switch_root"].state == "implausible"
    assert "584542y" in rec.analyze_time


def test_soft_reboot_phases_not_measurable():
    m, units, files = system_props()
    m["SoftRebootsCount"] = 1
    phases, clock, _ = phases_from_manager(m)
    assert clock == "target"
    assert all(phases[k].state == "not_measurable" for k in ("firmware", "loader", "kernel", "initrd", "total"))


def test_analyze_time_default_target_never_reached():
    m, units, _ = props("container-nspawn.json")
    dt = dict(units["default.target"], ActiveEnterTimestampMonotonic=0)
    assert analyze_time_text(m, dt).endswith("multi-user.target was never reached.")


def test_recorded_transport_rejects_garbage(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    from bootimg.errors import BootimgError

    with pytest.raises(BootimgError, match=r"x\.json: not a recorded property set"):
        RecordedTransport(bad)


# -- a real system boot: the QEMU board, dracut systemd initrd --------------------------------

def test_board_initrd_boot_reconciles_with_systemd_analyze():
    rec = replay("board-initrd.json", units=("ssh.service", "board-ready.service", "systemd-journald.service",
                                             "missing.service"))
    assert rec.analyze_time.rstrip() == load("board-initrd.json")["systemd_analyze_time"].rstrip()
    assert rec.clock == "target" and rec.system["systemd_initrd"] and rec.system["virtualization"] == "qemu"
    assert rec.phases["firmware"].state == rec.phases["loader"].state == "not_measurable"  # SeaBIOS: no EFI
    m = load("board-initrd.json")["objects"][MANAGER_PATH]
    assert rec.phases["kernel"].usec == m["InitRDTimestampMonotonic"]
    assert rec.phases["initrd"].usec == m["UserspaceTimestampMonotonic"] - m["InitRDTimestampMonotonic"]
    ms = rec.milestones
    assert ms["initrd_start"].usec < ms["root_mounted"].usec < ms["switch_root"].usec < ms["default_target"].usec \
        < ms["boot_finished"].usec
    # After switch-root systemd has garbage-collected sysroot.mount (not-found here): the root's
    # mount time comes from initrd-root-fs.target, said to be an upper bound.
    assert rec.units["sysroot.mount"].load_state == "not-found"
    assert ms["root_mounted"].source == "dbus:initrd-root-fs.target.ActiveEnterTimestampMonotonic"
    assert "upper bound" in ms["root_mounted"].note
    assert rec.units["ssh.service"].type == "notify" and rec.units["ssh.service"].active_state == "active"
    assert rec.system["kernel_cmdline"].startswith("root=LABEL=board-root")


def test_loader_variables_say_which_entry_booted_and_its_tries():
    from bootimg.kpi.collect import parse_loader_vars

    def var(text: str) -> str:       # an efivarfs file: 4 bytes of attributes, UTF-16LE, NUL
        return "07000000" + (text.encode("utf-16-le") + b"\0\0").hex()

    path = "\\loader\\entries\\bootimg-x-2.0+2-1.conf"
    got = parse_loader_vars(f"LoaderEntrySelected {var('bootimg-x-2.0')}\nLoaderBootCountPath {var(path)}\n")
    assert got == {"selected": "bootimg-x-2.0", "id": "bootimg-x-2.0",
                   "count_path": "\\loader\\entries\\bootimg-x-2.0+2-1.conf", "tries_left": 2, "tries_done": 1}
    # systemd 252's systemd-boot names the entry by its file name as it was when it booted it
    old = parse_loader_vars(f"LoaderEntrySelected {var('bootimg-x-2.0+3.conf')}\nLoaderBootCountPath {var(path)}\n")
    assert (old["selected"], old["id"], old["tries_left"], old["tries_done"]) == ("bootimg-x-2.0+3.conf", "bootimg-x-2.0", 2, 1)
    blessed = parse_loader_vars(f"LoaderEntrySelected {var('bootimg-x-1.0')}\n")
    assert blessed["selected"] == "bootimg-x-1.0" and blessed["tries_left"] is None
    # The ESP's entries: a fallback boot's record says which entry used up its tries.
    fallback = parse_loader_vars(f"LoaderEntrySelected {var('bootimg-x-2.0')}\n"
                                 "ENTRY bootimg-x-3.0+0-3.conf\nENTRY bootimg-x-2.0.conf\nENTRY bootimg-x-2.5+2-1.conf\n")
    assert fallback["entries"] == [
        {"id": "bootimg-x-2.0", "file": "bootimg-x-2.0.conf", "tries_left": None, "tries_done": None, "state": "good"},
        {"id": "bootimg-x-2.5", "file": "bootimg-x-2.5+2-1.conf", "tries_left": 2, "tries_done": 1, "state": "trying"},
        {"id": "bootimg-x-3.0", "file": "bootimg-x-3.0+0-3.conf", "tries_left": 0, "tries_done": 3, "state": "bad"}]
    assert parse_loader_vars("") is None and parse_loader_vars("LoaderEntrySelected zz\n") is None
