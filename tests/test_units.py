"""Boot-time container units (bootimg.boot.units, .unit_syntax, .resolve, .image_view, .quadlet).

The manifest maps to unit settings as documented in units.container_service; every generated
unit passes `systemd-analyze verify` (systemd 252, as on the target), which is shown to catch
broken units; the quadlet files pass a static check of podman 5.3's key lists, which is shown
to reject unknown keys; the mount helper (bootimg-setup-root mount-image) refuses bad arguments
in one line and, as root, mounts a real image (and refuses an unverified one in one line); a build of the example manifest
carries all of it in images/root.cfs, byte-identical across builds; and, where
systemd-nspawn is available, the units boot for real."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, composefs_mount, example_workspace, have, nspawn_report, requires_root, run_cli

from bootimg.boot import quadlet, resolve, sandbox, security, setup_root, systemd_check, unit_syntax, units
from bootimg.boot.image_view import ContainerImage
from bootimg.composefs.reader import load_image
from bootimg.composefs.store import ObjectStore
from bootimg.composefs.tree import Node
from bootimg.errors import BootimgError
from bootimg.manifest import Bind, ManifestError, limits, load_manifest
from bootimg.manifest.reserved import ASSESS_PROGRAM, QUADLET_DIR, SYSUSERS_FILE, UNIT_DIR
from bootimg.manifest.reserved import SETUP_ROOT as HELPER
from bootimg.sources import treeops

DIGEST = "ab" * 32
EPOCH = 1767225600
UNIT = UNIT_DIR

needs_analyze = pytest.mark.skipif(not have("systemd-analyze"), reason="needs systemd-analyze")


# -- helpers ------------------------------------------------------------------------------------------

def make_manifest(tmp_path: Path, containers: list[dict], *, fsverity: str = "required", name: str = "m.yaml"):
    """A valid manifest with these containers (JSON is YAML); image paths need not exist."""
    doc = {
        "apiVersion": "bootimg/v1",
        "identity": {"name": "unit-test", "version": "1.0", "source_date_epoch": EPOCH},
        "rootfs": {"source": {"type": "directory", "path": "rootfs"}},
        "containers": containers,
        "integrity": {"trust": "sealed", "fsverity": fsverity},
    }
    path = tmp_path / name
    path.write_text(json.dumps(doc, indent=1))
    return load_manifest(path, on_warning=None)


def box(name: str = "app", command: list[str] | None = None, image_type: str = "directory", **extra) -> dict:
    c = {"name": name, "image": {"type": image_type, "path": f"images/{name}"}}
    if image_type == "oci":
        c["image"]["ref"] = "latest"
    if command is not None:
        c["command"] = command
    elif image_type != "oci":
        c["command"] = [f"/usr/bin/{name}"]
    c.update(extra)
    return c


def generate(manifest, configs=None, images=None) -> dict[str, str]:
    files = units.unit_files(manifest, {c.name: DIGEST for c in manifest.containers}, configs, images)
    return {path: data.decode() for path, (data, _mode) in files.items()}


def section(text: str, name: str) -> list[str]:
    """The non-comment lines of one [section] of a unit file."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == name and line and not line.startswith("#"):
            out.append(line)
    return out


def commands_of(manifest, files: dict[str, str]) -> list[str]:
    """The container commands the units run (systemd-analyze checks them inside --root)."""
    exes = []
    for c in manifest.containers:
        line = next(x for x in files[f"{UNIT}/{c.name}.service"].splitlines() if x.startswith("ExecStart="))
        exes.append(shlex.split(line[len("ExecStart="):])[0])
    return exes


def image(files: dict[str, tuple[bytes, int]], symlinks: dict[str, str] | None = None) -> ContainerImage:
    root = Node(stat.S_IFDIR | 0o755)
    store = ObjectStore("/nonexistent-bootimg-store")  # only inline (<= 64 byte) files here
    for path, (data, mode) in files.items():
        treeops.add_file(root, path, data, mode, store=store)
    for path, target in (symlinks or {}).items():
        parts = [p.encode() for p in path.strip("/").split("/")]
        parent = treeops.make_dirs(root, parts[:-1])
        link = Node(stat.S_IFLNK | 0o777, size=len(target))
        link.payload = target.encode()
        parent.add_child(parts[-1], link)
    return ContainerImage(root)


def verify(files: dict[str, str], executables) -> subprocess.CompletedProcess:
    """systemd-analyze verify; the mount helper (a program every root carries) is one of the
    executables the image units need."""
    return systemd_check.systemd_verify({p: (d.encode(), 0o644) for p, d in files.items()},
                                executables=[*executables, HELPER])


# -- the mapping ------------------------------------------------------------------------------------------

def test_phases(tmp_path):
    m = make_manifest(tmp_path, [box("e", phase="early"), box("b", phase="basic"), box("d")])
    f = generate(m)
    early, basic, default = (section(f[f"{UNIT}/{n}.service"], "Unit") for n in "ebd")
    for lines in (early, basic):
        assert "DefaultDependencies=no" in lines
        assert "Conflicts=shutdown.target" in lines and "Before=shutdown.target" in lines
    assert "After=local-fs.target" in early and "Before=sysinit.target" in early
    assert "After=sysinit.target" in basic and "Before=basic.target" in basic
    assert not any(x.startswith("DefaultDependencies") or "sysinit" in x or "basic.target" in x for x in default)
    assert section(f[f"{UNIT}/sysinit.target.d/50-bootimg.conf"], "Unit") == ["Wants=e.service"]
    assert section(f[f"{UNIT}/basic.target.d/50-bootimg.conf"], "Unit") == ["Wants=b.service"]
    assert section(f[f"{UNIT}/multi-user.target.d/50-bootimg.conf"], "Unit") == ["Wants=bootimg-containers.target"]
    target = section(f[f"{UNIT}/bootimg-containers.target"], "Unit")
    assert "Wants=e.service b.service d.service" in target and "After=e.service b.service d.service" in target
    # Every container waits for its verified image; the image units have no default dependencies.
    for n in "ebd":
        assert {f"Requires=bootimg-image-{n}.service", f"After=bootimg-image-{n}.service"} <= \
            set(section(f[f"{UNIT}/{n}.service"], "Unit"))
        img = section(f[f"{UNIT}/bootimg-image-{n}.service"], "Unit")
        assert "DefaultDependencies=no" in img and "After=local-fs.target" in img
    # No early or basic containers: no drop-ins for their targets.
    f2 = generate(make_manifest(tmp_path, [box("d")], name="d.yaml"))
    assert f"{UNIT}/sysinit.target.d/50-bootimg.conf" not in f2 and f"{UNIT}/basic.target.d/50-bootimg.conf" not in f2


def test_readiness_restart_network_resources(tmp_path):
    m = make_manifest(tmp_path, [
        box("n", readiness="notify", restart="always", network="none",
            resources={"cpu_weight": 1000, "memory_max_mib": 64}),
        box("s", readiness="started", restart="never", network="host"),
        box("o", restart="on-failure", resources={"memory_max_mib": 1}),
    ])
    f = generate(m)
    n, s, o = (section(f[f"{UNIT}/{x}.service"], "Service") for x in "nso")
    assert n[:2] == ["Type=notify", "Restart=always"] and "NotifyAccess=main" in n
    assert "PrivateNetwork=yes" in n and "CPUWeight=1000" in n and "MemoryMax=64M" in n
    assert s[:2] == ["Type=exec", "Restart=no"] and "PrivateNetwork=yes" not in s
    assert not any(x.startswith("NotifyAccess=") for x in s)
    assert not any(x.startswith(("CPUWeight", "MemoryMax")) for x in s)
    assert "Restart=on-failure" in o and "MemoryMax=1M" in o and not any(x.startswith("CPUWeight") for x in o)
    for x, lines in zip("nso", (n, s, o)):
        assert {f"RootDirectory=/run/bootimg/containers/{x}", "MountAPIVFS=yes", "ProtectSystem=strict",
                "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes"} <= set(lines)
    q = {x: f[f"{QUADLET_DIR}/{x}.container"] for x in "nso"}
    assert "Notify=true" in section(q["n"], "Container") and "Network=none" in section(q["n"], "Container")
    assert "Notify=true" not in section(q["s"], "Container") and "Network=host" in section(q["s"], "Container")
    assert section(q["n"], "Service") == ["Restart=always", "CPUWeight=1000", "MemoryMax=64M"]
    # Podman's implicit network-online dependency is dropped where no network is wanted.
    assert section(q["n"], "Quadlet") == ["DefaultDependencies=false"] and section(q["s"], "Quadlet") == []


def test_essential(tmp_path):
    m = make_manifest(tmp_path, [box("r", essential="reboot", deadline_ms=2000), box("e", essential="emergency"),
                                 box("n", restart="never")])
    f = generate(m)
    # Restarts are exhausted after 5 starts within 5 start timeouts (not systemd's 10 s, which a
    # container whose sandboxed start takes over 2 s on a slow board never reaches).
    limits = {n: [x for x in section(f[f"{UNIT}/{n}.service"], "Unit") if x.startswith("StartLimit")] for n in "ren"}
    assert limits == {"r": ["StartLimitIntervalSec=25s", "StartLimitBurst=5"],
                      "e": ["StartLimitIntervalSec=450s", "StartLimitBurst=5"], "n": []}
    assert limits["r"] == [x for x in section(f[f"{QUADLET_DIR}/r.container"], "Unit") if x.startswith("StartLimit")]
    for name, expected in (("r", ["FailureAction=reboot"]),
                           ("e", ["OnFailure=emergency.target", "OnFailureJobMode=isolate"]), ("n", [])):
        # On the image unit too: a failed mount only fails the container's job ("dependency"),
        # which does not put the container unit into the failed state.
        for unit in (f"{name}.service", f"bootimg-image-{name}.service"):
            lines = section(f[f"{UNIT}/{unit}"], "Unit")
            assert [x for x in lines if x.startswith(("FailureAction", "OnFailure"))] == expected, unit


def test_ordering_and_deadline(tmp_path):
    m = make_manifest(tmp_path, [
        box("first", deadline_ms=800),
        box("second", deadline_ms=2600, ordering={"after": ["first", "other.service"], "before": ["x.target"],
                                                 "requires": ["first"], "wants": ["w.service"]}),
        box("third", deadline_ms=3500),
    ])
    f = generate(m)
    text = f[f"{UNIT}/second.service"]
    unit = section(text, "Unit")
    assert "After=first.service other.service" in unit and "Before=x.target" in unit
    assert "Requires=first.service" in unit and "Wants=w.service" in unit
    assert "# bootimg: deadline_ms=2600 " in text
    assert "TimeoutStartSec=5200ms" in section(text, "Service")
    assert "TimeoutStartSec=5s" in section(f[f"{UNIT}/first.service"], "Service")       # floor: 5 s
    assert "TimeoutStartSec=7s" in section(f[f"{UNIT}/third.service"], "Service")
    assert "deadline_ms" not in generate(make_manifest(tmp_path, [box("x")], name="x.yaml"))[f"{UNIT}/x.service"]
    assert units.start_timeout_ms(1) == 5000 and unit_syntax.timespan_ms(5200) == "5200ms"


def test_binds(tmp_path):
    m = make_manifest(tmp_path, [box("b", binds=[{"source": "/run/vsomeip", "target": "/run/vsomeip"},
                                                 {"source": "/etc/ca%1.pem", "target": "/data/ca.pem"}])])
    f = generate(m)
    assert "BindReadOnlyPaths=/run/vsomeip:/run/vsomeip /etc/ca%%1.pem:/data/ca.pem" in \
        section(f[f"{UNIT}/b.service"], "Service")
    start = next(x for x in section(f[f"{UNIT}/bootimg-image-b.service"], "Service") if x.startswith("ExecStart="))
    assert start == (f"ExecStart={HELPER} mount-image --bind=/run/vsomeip:/run/vsomeip --bind=/etc/ca%%1.pem:/data/ca.pem "
                     f"b {DIGEST}")
    vols = [x for x in section(f[f"{QUADLET_DIR}/b.container"], "Container") if x.startswith("Volume=")]
    assert vols == ["Volume=/run/vsomeip:/run/vsomeip:ro", "Volume=/etc/ca%%1.pem:/data/ca.pem:ro"]
    with pytest.raises(ManifestError, match=r"binds\[0\]\.source: '/a b' contains whitespace"):
        make_manifest(tmp_path, [box("b", binds=[{"source": "/a b", "target": "/x"}])], name="bad.yaml")
    # The units refuse it as well (a manifest made without validation).
    bad = dataclasses.replace(m, containers=(dataclasses.replace(m.containers[0], binds=(Bind("/a b", "/x"),)),))
    with pytest.raises(BootimgError, match="container 'b': bind source '/a b'"):
        generate(bad)


def test_fsverity_optional_is_passed_to_the_helper(tmp_path):
    f = generate(make_manifest(tmp_path, [box("a")], fsverity="optional"))
    assert f"ExecStart={HELPER} mount-image --fsverity=optional a {DIGEST}" in f[f"{UNIT}/bootimg-image-a.service"]
    f = generate(make_manifest(tmp_path, [box("a")], name="req.yaml"))
    assert f"ExecStart={HELPER} mount-image a {DIGEST}" in f[f"{UNIT}/bootimg-image-a.service"]
    assert f"ExecStop=-{HELPER} umount-image a" in f[f"{UNIT}/bootimg-image-a.service"]


def test_user_forms(tmp_path):
    passwd = b"root:x:0:0::/:/bin/sh\nsvc:x:1200:1300::/:/bin/sh\n"   # 45 bytes: inline
    group = b"root:x:0:\nsvcgrp:x:1400:\n"
    img = image({"/etc/passwd": (passwd, 0o644), "/etc/group": (group, 0o644), "/usr/bin/a": (b"#!/bin/sh\n", 0o755)})
    a = ["/usr/bin/a"]
    m = make_manifest(tmp_path, [box("a", user="1100:1100"), box("b", user="1100"), box("c", a, user="svc"),
                                 box("d", a, user="1200"), box("e"), box("f", a, user="svc")])
    f = generate(m, images={"c": img, "d": img, "f": img})
    def ids(n):
        return [x for x in section(f[f"{UNIT}/{n}.service"], "Service") if x.startswith(("User=", "Group="))]
    assert ids("a") == ["User=1100", "Group=1100"]
    assert ids("b") == ["User=1100"]                      # no group known: systemd's choice
    assert ids("c") == ["User=1200", "Group=1300"]        # a name means the image's passwd, not the host's
    assert ids("d") == ["User=1200", "Group=1300"]        # primary group from the image's passwd
    assert ids("e") == []                                  # the image's default (root)
    assert "# bootimg: user svc is 1200 in the image's /etc/passwd" in f[f"{UNIT}/c.service"]
    assert {"User=1100", "Group=1100"} <= set(section(f[f"{QUADLET_DIR}/a.container"], "Container"))
    # The numeric ids exist at boot (systemd refuses User= ids missing from the system's database).
    assert "After=systemd-sysusers.service" in section(f[f"{UNIT}/a.service"], "Unit")
    assert "After=systemd-sysusers.service" not in section(f[f"{UNIT}/e.service"], "Unit")
    assert [x for x in f[SYSUSERS_FILE].splitlines() if not x.startswith("#")] == [
        "g bootimg-1100 1100", "g bootimg-1300 1300",
        'u bootimg-1100 1100:1100 "bootimg containers a, b" - -',
        'u bootimg-1200 1200:1300 "bootimg containers c, d, f" - -',
    ]
    # Without the image a name is left for systemd; with it, an unknown name is an error.
    assert "User=svc" in generate(make_manifest(tmp_path, [box("c", user="svc")], name="n.yaml"))[f"{UNIT}/c.service"]
    with pytest.raises(BootimgError, match="container 'c': user 'nobody2' is not in its image's /etc/passwd"):
        generate(make_manifest(tmp_path, [box("c", a, user="nobody2")], name="u.yaml"), images={"c": img})
    # Nobody but root: no sysusers file.
    assert SYSUSERS_FILE not in generate(make_manifest(tmp_path, [box("r", user="0")], name="r.yaml"))


def test_oci_config_fallbacks_and_env_merge(tmp_path):
    m = make_manifest(tmp_path, [
        box("o", image_type="oci", environment={"MODE": "manifest", "EXTRA": "1"}),
        box("p", image_type="oci", command=["/bin/own", "x"]),
    ])
    configs = {
        "o": {"Entrypoint": ["/usr/bin/entry", "--flag"], "Cmd": ["arg one"], "User": "1100:1200",
              "Env": ["PATH=/usr/bin:/bin", "MODE=image", "NOEQUALS"], "WorkingDir": "/srv"},
        "p": {"Entrypoint": ["/usr/bin/entry"], "Cmd": ["ignored"], "Env": ["A=1"]},
    }
    f = generate(m, configs)
    o = section(f[f"{UNIT}/o.service"], "Service")
    assert 'ExecStart=/usr/bin/entry --flag "arg one"' in o
    assert [x for x in o if x.startswith("Environment=")] == [
        "Environment=EXTRA=1", "Environment=MODE=manifest", "Environment=PATH=/usr/bin:/bin"]
    assert "User=1100" in o and "Group=1200" in o and "WorkingDirectory=/srv" in o
    assert "# bootimg: command from the image's OCI config (Entrypoint + Cmd)" in f[f"{UNIT}/o.service"]
    assert "# bootimg: user 1100:1200 from the image's OCI config" in f[f"{UNIT}/o.service"]
    # The manifest's command replaces entrypoint and cmd alike.
    assert "ExecStart=/bin/own x" in section(f[f"{UNIT}/p.service"], "Service")
    q = section(f[f"{QUADLET_DIR}/o.container"], "Container")
    assert 'Exec=/usr/bin/entry --flag "arg one"' in q and "WorkingDir=/srv" in q
    # Neither the manifest nor the image says what to run: an error naming the container.
    with pytest.raises(BootimgError, match="container 'o': no command: the manifest sets none and its image"):
        generate(m, {"o": {"Env": ["A=1"]}, "p": {}})
    with pytest.raises(BootimgError, match="container 'o': no command"):
        generate(m, {})


def test_command_is_checked_in_the_image(tmp_path):
    img = image({"/usr/bin/real": (b"#!/bin/sh\n", 0o755), "/usr/bin/data": (b"x", 0o644)},
                {"/bin": "usr/bin", "/usr/local/bin/tool": "../../bin/real"})
    ok = make_manifest(tmp_path, [box("a", command=["/bin/real"]), box("b", command=["tool", "-v"]),
                                  box("c", command=["/usr/local/bin/tool"])])
    f = generate(ok, images={"a": img, "b": img, "c": img})
    assert "ExecStart=/bin/real" in f[f"{UNIT}/a.service"]                 # through the /bin symlink
    assert "ExecStart=/usr/local/bin/tool -v" in f[f"{UNIT}/b.service"]    # a bare name, found on PATH
    for command, message in ((["/usr/bin/missing"], "command /usr/bin/missing is not in its image"),
                             (["/usr/bin/data"], "command /usr/bin/data is not an executable file in its image"),
                             (["nothere"], "command 'nothere' is not on the image's PATH")):
        bad = make_manifest(tmp_path, [box("a", command=command)], name="bad.yaml")
        with pytest.raises(BootimgError, match=f"container 'a': {re.escape(message)}"):
            generate(bad, images={"a": img})
    with pytest.raises(ManifestError, match=r"command\[0\]: 'rel/x' cannot be an executable for systemd"):
        make_manifest(tmp_path, [box("a", command=["rel/x"])], name="bad.yaml")
    bad = dataclasses.replace(ok, containers=(dataclasses.replace(ok.containers[0], command=("rel/x",)),))
    with pytest.raises(BootimgError, match="container 'a': command 'rel/x' is a relative path"):
        generate(bad, images={"a": img})


TRICKY = ["plain", "two words", "", 'dq"uote', "sq'uote", "back\\slash", "100%", "%n", "$HOME", "${X}", "$$",
          ";", "a;b", "tab\there", "new\nline", "ünï", "-dash", "=eq"]


def test_quoting_of_tricky_arguments():
    assert unit_syntax.exec_word("plain") == "plain"
    assert unit_syntax.exec_word("two words") == '"two words"'
    assert unit_syntax.exec_word("") == '""'
    assert unit_syntax.exec_word('dq"uote') == '"dq\\"uote"'
    assert unit_syntax.exec_word("back\\slash") == '"back\\\\slash"'
    assert unit_syntax.exec_word("100%") == "100%%"
    assert unit_syntax.exec_word("$HOME") == "$$HOME"
    assert unit_syntax.exec_word(";") == '";"'            # a lone unquoted ; separates commands
    assert unit_syntax.exec_word("new\nline") == '"new\\nline"'
    assert unit_syntax.env_assignment("K", "a $b %c") == '"K=a $b %%c"'   # no $ expansion in Environment=
    assert unit_syntax.env_assignment("K", "v") == "K=v"
    for first in ("-x", "@x", "/a b/$x", "/bin/", "+x", "", "rel/x", "/a\"b"):
        with pytest.raises(BootimgError, match="cannot be an executable for systemd"):
            unit_syntax.exec_line([first, "arg"], container="c")


@needs_analyze
def test_tricky_arguments_pass_systemd_analyze(tmp_path):
    m = make_manifest(tmp_path, [box("t", command=["/usr/bin/t", *TRICKY],
                                     environment={"A": "x y", "B": 'q"', "C": "100%", "D": "$NOT", "E": "b\\s"})])
    f = generate(m)
    res = verify(f, ["/usr/bin/t"])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


# -- systemd-analyze verify ---------------------------------------------------------------------------

def example_manifest(tmp_path):
    ws = example_workspace(tmp_path / "ws")
    return ws, load_manifest(ws / "manifests" / "ivi-demo.yaml", on_warning=None)


EXAMPLE_CONFIGS = {  # what tools/example_inputs.py puts in the two OCI images' configs
    "vehicle-bus": {"Entrypoint": ["/usr/bin/vbusd"], "Env": ["PATH=/usr/bin"], "User": "1100:1100"},
    "cluster": {"Cmd": ["/usr/bin/clusterd"], "Env": ["PATH=/usr/bin"]},
}


@needs_analyze
def test_every_generated_unit_passes_systemd_analyze_verify(tmp_path):
    _, m = example_manifest(tmp_path)
    f = generate(m, EXAMPLE_CONFIGS)
    res = verify(f, commands_of(m, f))
    assert sorted(res.args[3:]) == sorted([
        "basic.target", "bootimg-containers.target", "multi-user.target", "sysinit.target",
        *[f"bootimg-image-{c.name}.service" for c in m.containers], *[f"{c.name}.service" for c in m.containers]])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    # Every mapping variant too.
    variants = make_manifest(tmp_path, [
        box("e", phase="early", readiness="notify", essential="reboot", restart="always", user="1100:1100",
            binds=[{"source": "/run/x", "target": "/run/x"}], resources={"cpu_weight": 5, "memory_max_mib": 8},
            deadline_ms=100),
        box("b", phase="basic", essential="emergency", restart="never", network="host", user="1200",
            ordering={"after": ["e"], "requires": ["e"], "wants": ["nonexistent-but-wanted.service"]}),
        box("d", ordering={"after": ["b", "network-online.target"], "before": ["multi-user.target"]},
            environment={"X": "1"}),
    ], fsverity="optional", name="variants.yaml")
    f = generate(variants)
    res = verify(f, ["/usr/bin/e", "/usr/bin/b", "/usr/bin/d"])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


@needs_analyze
def test_the_manifests_limits_are_what_systemd_accepts(tmp_path):
    """The largest deadline, memory limit and ids validate lets through give units systemd 252 takes
    without a word; one step further, systemd refuses the setting (what validate reports instead)."""
    top = [box("a", deadline_ms=limits.MAX_DURATION_MS, resources={"memory_max_mib": limits.MAX_MEMORY_MIB},
               user=f"{limits.ID_MAX}:{limits.ID_MAX}"),
           box("b", deadline_ms=limits.MAX_DURATION_MS - 1, user="65534:65536")]
    m = make_manifest(tmp_path, top)
    f = generate(m)
    assert "TimeoutStartSec=18446744073708s" in section(f[f"{UNIT}/a.service"], "Service")
    assert "TimeoutStartSec=18446744073707998ms" in section(f[f"{UNIT}/b.service"], "Service")
    res = verify(f, ["/usr/bin/a", "/usr/bin/b"])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    # One step further: validate refuses the manifest, and systemd would have refused the unit.
    mem, ids = limits.MAX_MEMORY_MIB, limits.ID_MAX
    assert unit_syntax.timespan_ms(units.start_timeout_ms(limits.MAX_DURATION_MS + 500)) == "18446744073709s"
    for key, value, old, new, complaint in [
        ("deadline_ms", limits.MAX_DURATION_MS + 500, "TimeoutStartSec=18446744073708s", "TimeoutStartSec=18446744073709s",
         "Failed to parse TimeoutStartSec="),
        ("resources", {"memory_max_mib": mem + 1}, f"MemoryMax={mem}M", f"MemoryMax={mem + 1}M", "Invalid memory limit"),
        ("user", "65535", f"User={ids}", "User=65535", "Invalid user/group name or numeric ID: 65535"),
        ("user", str(ids + 1), f"User={ids}", f"User={ids + 1}", f"Invalid user/group name or numeric ID: {ids + 1}"),
        ("user", "0100", f"User={ids}", "User=0100", "Invalid user/group name or numeric ID: 0100"),
    ]:
        with pytest.raises(ManifestError):
            make_manifest(tmp_path, [{**top[0], key: value}], name="beyond.yaml")
        unit = f[f"{UNIT}/a.service"]
        assert old in unit
        res = verify({**f, f"{UNIT}/a.service": unit.replace(old, new)}, ["/usr/bin/a", "/usr/bin/b"])
        assert complaint in res.stderr, (key, value, res.stderr)
    # The units refuse such an id too (one from an image's /etc/passwd, say).
    bad = dataclasses.replace(m, containers=(dataclasses.replace(m.containers[0], user="65535"),))
    with pytest.raises(BootimgError, match="container 'a': user or group 65535 is not a valid id for systemd"):
        generate(bad)


@needs_analyze
@pytest.mark.parametrize("breakage, expected", [
    (("telemetry.service", "Type=exec", "Type=exec\nRestartSecs=1"), "Unknown key 'RestartSecs'"),
    (("telemetry.service", "Restart=on-failure", "Restart=sometimes"), "Failed to parse service restart"),
    (("vehicle-bus.service", "FailureAction=reboot", "FailureAction=reboot\nAfter=multi-user.target"),
     "Found ordering cycle"),
    (("telemetry.service", "ExecStart=/usr/bin/telemetryd", 'ExecStart=/usr/bin/telemetryd "open'),
     "Unbalanced quoting"),
    (("multi-user.target.d/50-bootimg.conf", "Wants=", "Wantz="), "Unknown key 'Wantz'"),
    (("cluster.service", "Requires=bootimg-image-cluster.service", "Requires=bootimg-image-clustr.service"),
     "Unit bootimg-image-clustr.service not found"),
    (None, "Command /usr/bin/telemetryd is not executable"),
])
def test_systemd_analyze_catches_broken_units(tmp_path, breakage, expected):
    _, m = example_manifest(tmp_path)
    f = generate(m, EXAMPLE_CONFIGS)
    exes = commands_of(m, f)
    if breakage is None:
        exes.remove("/usr/bin/telemetryd")
    else:
        name, old, new = breakage
        assert old in f[f"{UNIT}/{name}"]
        f[f"{UNIT}/{name}"] = f[f"{UNIT}/{name}"].replace(old, new, 1)
    res = verify(f, exes)
    assert res.stdout + res.stderr != ""
    assert expected in res.stderr


# -- quadlet -----------------------------------------------------------------------------------------------

@needs_analyze
def test_quadlets_pass_the_static_check_and_systemd(tmp_path):
    _, m = example_manifest(tmp_path)
    f = generate(m, EXAMPLE_CONFIGS)
    quadlets = {p: t for p, t in f.items() if p.startswith(QUADLET_DIR)}
    assert len(quadlets) == 4
    for path, text in quadlets.items():
        assert quadlet.check_container(text, path) == []
        assert "# Podman quadlet (needs podman >= 4.5)" in text
        for group in ("Container", "Quadlet"):
            for line in section(text, group):
                assert (group, line.split("=", 1)[0]) in quadlet.EMITTED_KEYS_SINCE, line
    # The [Unit]/[Service]/[Install] parts, as the service quadlet would make: systemd accepts them.
    shadow = dict(f)
    for path, text in quadlets.items():
        name = Path(path).stem
        shadow[f"{UNIT}/{name}.service"] = quadlet.approximate_service(text)
    res = verify(shadow, ["/usr/bin/podman"])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_quadlet_check_rejects_bad_files():
    good = "[Unit]\nDescription=x\n[Container]\nRootfs=/r\nExec=/bin/x\n[Install]\nWantedBy=a.target\n"
    assert quadlet.check_container(good, "q.container") == []
    problems = quadlet.check_container(good.replace("Exec=/bin/x", "Exec=/bin/x\nRootFS=/typo"), "q.container")
    assert problems == ["q.container:6: unsupported key 'RootFS' in group 'Container' "
                        f"(not in {quadlet.PODMAN_REFERENCE})"]
    cases = {
        good.replace("Rootfs=/r", "Image=quay.io/x\nRootfs=/r"): "the Image and Rootfs keys conflict",
        good.replace("Rootfs=/r\n", ""): "no Image or Rootfs key specified",
        good.replace("Exec=/bin/x", "Exec=/bin/x\nGroup=5"): "invalid Group set without User",
        good + "[Service]\nType=exec\n": "invalid service Type 'exec'",
        good + "[Service]\nKillMode=none\n": "invalid KillMode 'none'",
        good + "[Quadlet]\nDefaultDependencies=maybe\n": "DefaultDependencies=maybe: not a boolean",
        good + "[Quadlet]\nPull=never\n": "unsupported key 'Pull' in group 'Quadlet'",
        good.replace("WantedBy=", "Also="): "unsupported key 'Also' in group 'Install'",
        good + "[Bogus]\nA=b\n": "unknown group [Bogus]",
        good.replace("ReadOnly", "x") + "[Container]\nReadOnly=perhaps\n": "ReadOnly=perhaps: not a boolean",
        "Rootfs=/x\n" + good: "assignment outside of any group",
    }
    for text, message in cases.items():
        assert any(message in p for p in quadlet.check_container(text, "q")), (message, text)
    assert quadlet.check_container(good + "[X-Custom]\nAnything=1\n", "q") == []
    # Continuation lines are joined the way systemd joins them.
    parsed = quadlet.parse_unit("[Container]\nExec=/bin/x \\\n  --flag\n")
    assert parsed.values("Container", "Exec") == ["/bin/x  --flag"]


def test_quadlet_needs_newer_podman_for_workdir(tmp_path):
    m = make_manifest(tmp_path, [box("w", image_type="oci")])
    f = generate(m, {"w": {"Cmd": ["/bin/w"], "WorkingDir": "/srv"}})
    assert "# Podman quadlet (needs podman >= 4.6)" in f[f"{QUADLET_DIR}/w.container"]


# -- the sandbox -------------------------------------------------------------------------------------------

def service_sandbox(text: str) -> list[str]:
    """The sandbox lines of a NAME.service: [Service] from NoNewPrivileges= on."""
    lines = section(text, "Service")
    return lines[lines.index("NoNewPrivileges=yes"):]


def unit_scores(files: dict[str, str], names: list[str]) -> dict[str, dict]:
    """The real systemd-analyze security --offline=true on generated units."""
    return security.score({p: d.encode() for p, d in files.items() if p.startswith(UNIT + "/")}, names,
                          "systemd-analyze")


@needs_analyze
@pytest.mark.parametrize("name", ["ivi-demo.yaml", "board.yaml"])
def test_example_containers_are_sandboxed(tmp_path, name):
    """Every example container scores <= 2.5 in systemd-analyze security (the unsandboxed
    units scored 8.7-9.1), and what relaxes a unit's sandbox is its manifest's sandbox: key."""
    m = load_manifest(REPO / "manifests" / name, on_warning=None)
    f = generate(m, EXAMPLE_CONFIGS)
    names = [f"{c.name}.service" for c in m.containers]
    scores = unit_scores(f, names)
    assert sorted(scores) == sorted(names)
    for unit, s in scores.items():
        assert s["exposure"] <= 2.5 and s["level"] in ("SAFE", "OK"), (unit, s)
    # systemd-analyze's own verdict (its exit status; --threshold is in tenths), which can fail
    root = tmp_path / "root"
    for path, text in f.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(text)
    for threshold, code in (("25", 0), ("0", 1)):
        res = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}", f"--threshold={threshold}",
                              "--no-pager", *names], capture_output=True, text=True)
        assert res.returncode == code, (threshold, res.stdout[-2000:], res.stderr)
    # Without its sandbox: key a container gets exactly the default settings; with it, the unit
    # names the relaxations and their reason.
    relaxed = [c for c in m.containers if c.sandbox is not None]
    assert [c.name for c in relaxed] == (["vehicle-bus", "rear-camera"] if name == "ivi-demo.yaml" else ["vehicle-bus"])
    for c in m.containers:
        r = resolve.resolve(m, c, EXAMPLE_CONFIGS.get(c.name))
        default = sandbox.service_lines(dataclasses.replace(c, sandbox=None), r.user)
        assert service_sandbox(f[f"{UNIT}/{c.name}.service"]) == sandbox.service_lines(c, r.user)
        assert (sandbox.service_lines(c, r.user) != default) == (c.sandbox is not None), c.name
        text = f[f"{UNIT}/{c.name}.service"]
        assert ("# bootimg: sandbox relaxed by the manifest: " in text) == (c.sandbox is not None)
        if c.sandbox is not None:
            assert f"# bootimg: reason: {c.sandbox.reason}\n" in text


# Each relaxation: the manifest's sandbox keys, the line it puts in the unit (or None) and the one
# it takes out (or None), and the settings systemd-analyze then counts against the unit.
RELAXATIONS = [
    ({"capabilities": ["CAP_NET_RAW"]}, "CapabilityBoundingSet=CAP_NET_RAW", "PrivateUsers=yes",
     {"CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)", "PrivateUsers=", "AmbientCapabilities="}),
    ({"address_families": ["AF_PACKET"]}, "RestrictAddressFamilies=AF_UNIX AF_PACKET", None,
     {"RestrictAddressFamilies=~AF_PACKET"}),
    ({"address_families": ["AF_INET"]}, "RestrictAddressFamilies=AF_UNIX AF_INET", "IPAddressDeny=any",
     {"RestrictAddressFamilies=~AF_(INET|INET6)", "IPAddressDeny="}),
    ({"system_calls": ["@clock"]}, "SystemCallFilter=@clock", None,     # @privileged includes @clock
     {"SystemCallFilter=~@clock", "SystemCallFilter=~@privileged"}),
    ({"namespaces": ["net", "user"]}, "RestrictNamespaces=net user", "RestrictNamespaces=yes",
     {"RestrictNamespaces=~net", "RestrictNamespaces=~user"}),
    ({"realtime_priority": 10}, "LimitRTPRIO=10", "RestrictRealtime=yes",
     {"RestrictRealtime=", "SystemCallFilter=~@resources"}),
    ({"notify_access": "all"}, "NotifyAccess=all", "NotifyAccess=main", {"NotifyAccess="}),
    ({"umask": "0022"}, "UMask=0022", "UMask=0077", {"UMask="}),
    ({"allow": ["host_users"]}, None, "PrivateUsers=yes", {"PrivateUsers="}),
    ({"allow": ["host_ipc"]}, None, "RemoveIPC=yes", {"RemoveIPC="}),
    ({"allow": ["write_execute_memory"]}, None, "MemoryDenyWriteExecute=yes", {"MemoryDenyWriteExecute="}),
    ({"allow": ["personality"]}, None, "LockPersonality=yes", {"LockPersonality="}),
    ({"allow": ["suid_sgid"]}, None, "RestrictSUIDSGID=yes", {"RestrictSUIDSGID="}),
    ({"allow": ["kernel_tunables"]}, None, "ProtectKernelTunables=yes", {"ProtectKernelTunables="}),
    ({"allow": ["kernel_modules"]}, None, "ProtectKernelModules=yes", {"ProtectKernelModules="}),
    ({"allow": ["kernel_logs"]}, None, "ProtectKernelLogs=yes", {"ProtectKernelLogs="}),
    ({"allow": ["clock"]}, None, "ProtectClock=yes", {"ProtectClock="}),
    ({"allow": ["hostname"]}, None, "ProtectHostname=yes", {"ProtectHostname="}),
    ({"allow": ["control_groups"]}, None, "ProtectControlGroups=yes", {"ProtectControlGroups="}),
    ({"allow": ["other_processes"]}, None, "ProtectProc=invisible", {"ProtectProc="}),
    ({"allow": ["proc_files"]}, None, "ProcSubset=pid", {"ProcSubset="}),
    ({"allow": ["foreign_abis"]}, None, "SystemCallArchitectures=native", {"SystemCallArchitectures="}),
]


@needs_analyze
@pytest.mark.parametrize("relax, added, removed, exposed", RELAXATIONS,
                         ids=[next(iter(r[0].items())).__repr__() for r in RELAXATIONS])
def test_a_relaxation_shows_in_the_unit_and_in_its_score(tmp_path, relax, added, removed, exposed):
    base = {"user": "1100:1100", "readiness": "notify"}
    m = make_manifest(tmp_path, [box("strict", **base), box("relaxed", **base, sandbox={"reason": "test", **relax})])
    f = generate(m)
    strict, loose = (service_sandbox(f[f"{UNIT}/{n}.service"]) for n in ("strict", "relaxed"))
    if added is not None:
        assert added in loose and added not in strict
    if removed is not None:
        assert removed in strict and removed not in loose
    assert "# bootimg: sandbox relaxed by the manifest: " in f[f"{UNIT}/relaxed.service"]
    scores = unit_scores(f, ["strict.service", "relaxed.service"])
    before = {x["setting"]: x["exposure"] for x in scores["strict.service"]["exposed"]}
    after = {x["setting"]: x["exposure"] for x in scores["relaxed.service"]["exposed"]}
    assert set(after) - set(before) == exposed
    # The overall exposure rises by what the newly exposed settings weigh (each is rounded up
    # to a tenth in the table, the total once).
    rise = scores["relaxed.service"]["exposure"] - scores["strict.service"]["exposure"]
    new = sum(after[s] for s in exposed)
    assert new - 0.1 * len(exposed) - 1e-9 <= rise <= new + 1e-9, (rise, new)


@needs_analyze
def test_devices_relaxation(tmp_path):
    """A /dev bind is readable (DeviceAllow=SRC r); sandbox.devices makes it writable, or brings in
    a node that is not bound. systemd-analyze rates any device list alike, so it shows in the
    description only."""
    binds = [{"source": "/dev/video0", "target": "/dev/video0"}]
    m = make_manifest(tmp_path, [
        box("ro", binds=binds),
        box("rw", binds=binds, sandbox={"reason": "t", "devices": [{"path": "/dev/video0", "access": "rw"},
                                                                   {"path": "/dev/ttyS1", "access": "w"}]}),
    ])
    f = generate(m)
    ro, rw = (service_sandbox(f[f"{UNIT}/{n}.service"]) for n in ("ro", "rw"))
    assert [x for x in ro if x.startswith(("DeviceAllow=", "BindPaths="))] == ["DeviceAllow=/dev/video0 r"]
    assert [x for x in rw if x.startswith(("DeviceAllow=", "BindPaths="))] == [
        "DeviceAllow=/dev/video0 rw", "DeviceAllow=/dev/ttyS1 w", "BindPaths=/dev/ttyS1:/dev/ttyS1"]
    assert "PrivateDevices=yes" in ro and "PrivateDevices=yes" in rw
    scores = unit_scores(f, ["ro.service", "rw.service"])
    desc = {n: next(x["description"] for x in scores[f"{n}.service"]["exposed"] if x["setting"] == "DeviceAllow=")
            for n in ("ro", "rw")}
    assert "/dev/video0:r" in desc["ro"] and "/dev/video0:rw" in desc["rw"] and "/dev/ttyS1:w" in desc["rw"]
    # podman: device nodes as AddDevice= (a bound node would not pass its device cgroup)
    q = section(f[f"{QUADLET_DIR}/rw.container"], "Container")
    assert "AddDevice=/dev/video0:/dev/video0:rw" in q and "AddDevice=/dev/ttyS1:/dev/ttyS1:w" in q
    assert not any(x.startswith("Volume=/dev/") for x in q)
    assert verify(f, ["/usr/bin/ro", "/usr/bin/rw"]).returncode == 0


@needs_analyze
def test_systemd_knows_every_value_the_schema_allows(tmp_path):
    """A unit with every capability, address family, system call group, namespace and protection
    the schema offers passes systemd-analyze verify without a word (systemd only warns about, and
    ignores, a name it does not know), and the schema's capabilities and system call groups are
    exactly systemd's."""
    props = json.loads((REPO / "bootimg" / "manifest" / "schema.json").read_text())["definitions"]["sandbox"]["properties"]
    groups = re.findall(r"[a-z-]+", props["system_calls"]["items"]["pattern"].split(")|")[0])
    everything = {
        "reason": "all of it", "capabilities": props["capabilities"]["items"]["enum"],
        "system_calls": [f"@{g}" for g in groups] + ["sched_setattr"],
        "address_families": props["address_families"]["items"]["enum"],
        "devices": [{"path": "/dev/ttyS1", "access": "rw"}], "namespaces": props["namespaces"]["items"]["enum"],
        "realtime_priority": 99, "notify_access": "all", "umask": "0022", "allow": props["allow"]["items"]["enum"],
    }
    m = make_manifest(tmp_path, [box("all", readiness="notify", user="1100", network="host", sandbox=everything)])
    f = generate(m)
    res = verify(f, ["/usr/bin/all"])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    caps = subprocess.run(["systemd-analyze", "capability", "--no-pager"], capture_output=True, text=True).stdout
    assert {line.split()[0].upper() for line in caps.splitlines()[1:] if line.strip()} == set(everything["capabilities"])
    sets = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True).stdout
    assert {line[1:] for line in sets.splitlines() if line.startswith("@")} == set(groups)


def test_quadlet_sandbox_keys(tmp_path):
    m = make_manifest(tmp_path, [box("q", sandbox={"reason": "t", "capabilities": ["CAP_NET_RAW", "CAP_NET_ADMIN"],
                                                   "realtime_priority": 20}), box("p")])
    f = generate(m)
    text = f[f"{QUADLET_DIR}/q.container"]
    assert quadlet.check_container(text, "q.container") == []
    lines = section(text, "Container")
    assert {"DropCapability=all", "AddCapability=CAP_NET_ADMIN CAP_NET_RAW", "Ulimit=rtprio=20:20"} <= set(lines)
    assert "# Podman quadlet (needs podman >= 4.7)" in text                  # Ulimit=
    assert "DropCapability=all" in section(f[f"{QUADLET_DIR}/p.container"], "Container")
    # root keeps them in its bounding set; a non-root user gets them as ambient capabilities too
    s = service_sandbox(f[f"{UNIT}/q.service"])
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" in s and not any(x.startswith("Ambient") for x in s)
    assert "PrivateUsers=yes" not in s and "PrivateUsers=yes" in service_sandbox(f[f"{UNIT}/p.service"])


# -- templates and packaging -------------------------------------------------------------------------------

def test_templates_ship_and_render_strictly():
    names = {p.name for p in (REPO / "bootimg" / "boot" / "templates").iterdir()}
    assert {"bootimg-image.service.in", "container.service.in", "container.container.in",
            "bootimg-containers.target.in", "wants.conf.in", "sysusers.conf.in"} <= names
    assert (REPO / "units").resolve() == (REPO / "bootimg" / "boot" / "templates").resolve()
    assert 'templates/*' in (REPO / "pyproject.toml").read_text()
    with pytest.raises(KeyError, match="no value for @WANTS@"):
        unit_syntax.render("wants.conf.in", {"RELEASE": "r", "WHY": "w"})
    with pytest.raises(KeyError, match="unused values"):
        unit_syntax.render("wants.conf.in", {"RELEASE": "r", "WHY": "w", "WANTS": "x", "EXTRA": "y"})
    assert not re.search(r"@[A-Z_]+@", unit_syntax.render("wants.conf.in", {"RELEASE": "r", "WHY": "w", "WANTS": "x"}))


def test_no_containers_no_files(tmp_path):
    assert units.unit_files(make_manifest(tmp_path, []), {}) == {}


def test_generation_is_deterministic(tmp_path):
    _, m = example_manifest(tmp_path)
    digests = {c.name: DIGEST for c in m.containers}
    assert units.unit_files(m, digests, EXAMPLE_CONFIGS) == units.unit_files(m, dict(reversed(digests.items())),
                                                                              EXAMPLE_CONFIGS)


def test_add_sysroot_makes_an_empty_directory(tmp_path):
    m = make_manifest(tmp_path, [])

    class Ctx:
        manifest = m

    root = Node(stat.S_IFDIR | 0o755)
    units.add_sysroot(Ctx, root)
    node = root.lookup(b"/sysroot")
    assert node.is_dir() and node.children == {} and node.mtime_sec == EPOCH
    units.add_sysroot(Ctx, root)  # already there and empty: fine
    treeops.add_file(root, "/sysroot/stray", b"x", store=ObjectStore(tmp_path / "s"))
    with pytest.raises(BootimgError, match="/sysroot must be empty .*it holds: stray"):
        units.add_sysroot(Ctx, root)


# -- the mount helper -------------------------------------------------------------------------------------

def run_helper(*args, env=None):
    """bootimg-setup-root mount-image ARGS, the TEST build (BOOTIMG_RELEASE and BOOTIMG_RUN move
    its paths; BOOTIMG_TEST_VERITY simulates fs-verity, which this host's kernel lacks)."""
    full = {"PATH": os.environ["PATH"], **(env or {})}
    program = setup_root.build(variant="test")
    return subprocess.run([str(program), "mount-image", *args], capture_output=True, text=True, env=full, timeout=60)


@pytest.mark.parametrize("args, message", [
    ([], "usage:"),
    (["--fsverity=sometimes", "a", DIGEST], "usage:"),
    (["Bad_Name", DIGEST], "invalid container name"),
    (["a", "xyz"], "invalid digest 'xyz'"),
    (["--bind=relative:/x", "a", DIGEST], "usage:"),
    (["--bind=/a/../b:/x", "a", DIGEST], "invalid --bind"),
    (["a", DIGEST], "/nonexistent/objects: no such directory"),
])
def test_helper_refuses_bad_arguments_in_one_line(args, message):
    res = run_helper(*args, env={"BOOTIMG_RELEASE": "/nonexistent", "BOOTIMG_RUN": "/nonexistent-run"})
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("bootimg: FATAL: container ")
    assert message in res.stderr


def test_helper_release_dir_from_booted_json(tmp_path):
    # Without BOOTIMG_RELEASE the release and the store are booted.json's (the booted release's).
    res = run_helper("a", DIGEST, env={"BOOTIMG_RUN": str(tmp_path)})
    assert f"cannot read {tmp_path}/booted.json: No such file or directory" in res.stderr
    (tmp_path / "booted.json").write_text(json.dumps({"release_dir": "/sysroot/bootimg/releases/1.4.0",
                                                      "objects": "/sysroot/bootimg/objects"}))
    res = run_helper("a", DIGEST, env={"BOOTIMG_RUN": str(tmp_path), "BOOTIMG_TEST_ROOT": "/nonexistent"})
    assert res.stderr == "bootimg: FATAL: container a: /nonexistent/sysroot/bootimg/objects: no such directory\n"
    (tmp_path / "booted.json").write_text(json.dumps({"release_dir": "/sysroot/bootimg/releases/../x",
                                                      "objects": "/sysroot/bootimg/objects"}))
    res = run_helper("a", DIGEST, env={"BOOTIMG_RUN": str(tmp_path)})
    assert res.stderr == f"bootimg: FATAL: container a: {tmp_path}/booted.json has no safe release_dir and objects\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The example manifest built twice (fs-verity optional for a variant that mounts here)."""
    top = tmp_path_factory.mktemp("units-build")
    ws = example_workspace(top / "ws")
    outs = []
    for i in (1, 2):
        out = top / f"out{i}"
        res = run_cli("build", str(ws / "manifests" / "ivi-demo.yaml"), "-o", str(out), "--no-boot-check",
                      "--key", str(ws / "build" / "keys" / "release-2026.key"))
        assert res.returncode == 0, res.stderr.decode()
        outs.append(out)
    return ws, outs


def root_files(out: Path) -> dict[str, tuple[bytes, int]]:
    """The boot-unit files inside OUT/images/root.cfs, read back with the object store."""
    root = load_image(out / "images" / "root.cfs").root
    found = {}
    for node in root.walk():
        path = node.path().decode()
        if not node.is_reg() or not path.startswith((UNIT, QUADLET_DIR, HELPER,
                                                      SYSUSERS_FILE)):
            continue
        data = node.content if node.content is not None else (out / "objects" / node.payload.decode()).read_bytes()
        found[path] = (bytes(data), stat.S_IMODE(node.mode))
    return found


def test_build_puts_the_units_in_the_root_image(built):
    ws, (out1, out2) = built
    release = json.loads((out1 / "release.json").read_bytes())
    files = root_files(out1)
    m = load_manifest(ws / "manifests" / "ivi-demo.yaml", on_warning=None)
    names = [c.name for c in m.containers]
    expected = {f"{UNIT}/{n}" for n in ("bootimg-containers.target", "multi-user.target.d/50-bootimg.conf",
                                         "sysinit.target.d/50-bootimg.conf", "basic.target.d/50-bootimg.conf")}
    for n in names:
        expected |= {f"{UNIT}/{n}.service", f"{UNIT}/bootimg-image-{n}.service", f"{QUADLET_DIR}/{n}.container"}
    expected |= {HELPER, SYSUSERS_FILE}
    assert expected <= set(files)
    assert files[HELPER] == (setup_root.build().read_bytes(), 0o755)
    # Each image unit pins its container to the digest the release records for it.
    for n in names:
        text = files[f"{UNIT}/bootimg-image-{n}.service"][0].decode()
        assert f" {n} {release['images'][n]['digest']}\n" in text
    # The same files as generated straight from the manifest and the images' configs.
    direct = units.unit_files(m, {n: release["images"][n]["digest"] for n in names}, EXAMPLE_CONFIGS)
    assert {p: v for p, v in files.items() if p in direct} == direct
    # Two builds: the same root image, byte for byte.
    assert (out1 / "images" / "root.cfs").read_bytes() == (out2 / "images" / "root.cfs").read_bytes()
    assert root_files(out2) == files


@needs_analyze
def test_units_from_the_root_image_pass_systemd_analyze(built):
    ws, (out, _) = built
    files = root_files(out)
    m = load_manifest(ws / "manifests" / "ivi-demo.yaml", on_warning=None)
    decoded = {p: d.decode() for p, (d, _) in files.items() if p != HELPER}    # the helper is a program
    # /bin/sh: the root's shell, which the blessing's ExecCondition= runs
    res = systemd_check.systemd_verify(files, executables=[*commands_of(m, decoded), "/bin/sh", ASSESS_PROGRAM])
    assert (res.returncode, res.stdout, res.stderr) == (0, "", ""), res.stderr


@needs_analyze
def test_build_reports_each_units_sandbox_score(built, tmp_path):
    ws, (out1, out2) = built
    manifest, key = str(ws / "manifests" / "ivi-demo.yaml"), str(ws / "build" / "keys" / "release-2026.key")
    m = load_manifest(ws / "manifests" / "ivi-demo.yaml", on_warning=None)
    names = [f"{c.name}.service" for c in m.containers]
    report = json.loads((out1 / "sandbox.json").read_bytes())
    assert (out1 / "sandbox.json").read_bytes() == (out2 / "sandbox.json").read_bytes()
    assert report["scored"] is True and report["tool"] == "systemd-analyze security --offline=true"
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert report["systemd"] == version
    assert sorted(report["units"]) == sorted(names)
    # The scores are systemd-analyze's for the units the root image carries.
    root = tmp_path / "root"
    for path, (data, _) in root_files(out1).items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_bytes(data)
    text = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", *names],
                          capture_output=True, text=True).stdout
    overall = dict(re.findall(r"Overall exposure level for (\S+): (\d+\.\d) ", text))
    assert {u: str(e["exposure"]) for u, e in report["units"].items()} == overall
    cam = report["units"]["rear-camera.service"]
    assert cam["relaxed"] == {"devices": ["/dev/video0 rw"]} and cam["reason"].startswith("V4L2")
    assert "relaxed" not in report["units"]["telemetry.service"]
    assert all(x["exposure"] > 0 for e in report["units"].values() for x in e["exposed"])
    # `bootimg build` prints each unit's score; --json carries the report.
    res = run_cli("build", manifest, "-o", str(tmp_path / "a"), "--key", key, "--no-boot-check")
    assert res.returncode == 0, res.stderr.decode()
    printed = res.stdout.decode()
    assert f"sandbox exposure (systemd-analyze security --offline=true, {version}" in printed
    for unit, entry in report["units"].items():
        assert re.search(rf"^ +{re.escape(unit)} +{entry['exposure']} {entry['level']}\b", printed, re.M), printed
    assert "rear-camera.service" in printed and "relaxed: devices /dev/video0 rw" in printed
    res = run_cli("build", manifest, "-o", str(tmp_path / "b"), "--key", key, "--no-boot-check", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["sandbox"] == report
    # Without systemd-analyze on the build host: said plainly, no scores, the same release.
    bare_path = tmp_path / "bin"        # the host's programs but systemd-analyze
    bare_path.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for tool in (Path(d).iterdir() if Path(d).is_dir() else ()):
            if tool.name != "systemd-analyze" and not (bare_path / tool.name).exists():
                (bare_path / tool.name).symlink_to(tool)
    res = run_cli("build", manifest, "-o", str(tmp_path / "c"), "--key", key, "--no-boot-check",
                  env={"PATH": str(bare_path)})
    assert res.returncode == 0, res.stderr.decode()
    assert "sandbox: NOT SCORED: systemd-analyze is not on this build host's PATH" in res.stdout.decode()
    bare = json.loads((tmp_path / "c" / "sandbox.json").read_bytes())
    assert bare["scored"] is False and bare["systemd"] is None
    assert bare["units"]["rear-camera.service"] == {"container": "rear-camera", "relaxed": cam["relaxed"],
                                                    "reason": cam["reason"]}
    for name in ("release.json", "release.json.minisig", "images/root.cfs"):
        assert (tmp_path / "c" / name).read_bytes() == (out1 / name).read_bytes()


def test_built_root_has_a_sysroot_directory(built):
    _, (out, _) = built
    node = load_image(out / "images" / "root.cfs").root.lookup(b"/sysroot")
    assert node is not None and node.is_dir()
    assert node.children == {}
    # and a /tmp for the hook's tmpfs (the example rootfs has none; PrivateDevices= needs it)
    tmp = load_image(out / "images" / "root.cfs").root.lookup(b"/tmp")
    assert tmp is not None and tmp.is_dir() and stat.S_IMODE(tmp.mode) == 0o1777 and tmp.children == {}


@requires_root
@pytest.mark.kernel
def test_helper_mounts_a_real_image_and_fails_closed(built, tmp_path):
    _, (out, _) = built
    release = json.loads((out / "release.json").read_bytes())
    digest = release["images"]["rear-camera"]["digest"]
    run = tmp_path / "run"
    env = {"BOOTIMG_RELEASE": str(out), "BOOTIMG_RUN": str(run)}
    (tmp_path / "srcdir").mkdir()
    (tmp_path / "srcfile").write_text("x")
    binds = [f"--bind={tmp_path}/srcdir:/data/dir", f"--bind={tmp_path}/srcfile:/etc/conf.json"]
    target = run / "containers" / "rear-camera"
    # fs-verity "required" (this host's kernel has no fs-verity): refused, one line, nothing mounted.
    res = run_helper(*binds, "rear-camera", digest, env=env)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith("bootimg: FATAL: container rear-camera: ") and "no fs-verity digest" in res.stderr
    assert subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0
    # "optional": warns and mounts, read-only, with the skeleton of mount points.
    res = run_helper("--fsverity=optional", *binds, "rear-camera", digest, env=env)
    try:
        assert res.returncode == 0, res.stderr
        assert "WARNING" in res.stderr and "UNVERIFIED" in res.stderr
        assert (target / "usr/bin/rvc").read_bytes().startswith(b"#!/usr/bin/sh")
        for d in ("dev", "proc", "sys", "run", "tmp", "var/tmp", "data/dir"):
            assert (target / d).is_dir(), d
        assert (target / "etc/conf.json").is_file() and (target / "etc/conf.json").stat().st_size == 0
        with pytest.raises(OSError):
            (target / "new").write_text("x")
        opts = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", str(target)], capture_output=True,
                              text=True).stdout.strip()
        assert "ro" in opts.split(",")
    finally:
        res = run_helper("--umount", "rear-camera", env=env)
    assert res.returncode == 0, res.stderr
    for m in ("containers", "skel", "images"):
        assert subprocess.run(["mountpoint", "-q", str(run / m / "rear-camera")]).returncode != 0
    assert str(out) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    # A different digest is named (fs-verity simulated: this kernel has none).
    res = run_helper("rear-camera", "1" * 64, env={**env, "BOOTIMG_TEST_VERITY": "enabled"})
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1
    assert f"has fs-verity digest sha256:{digest}, expected sha256:{'1' * 64}" in res.stderr
    assert subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0


# -- booting the units for real (systemd-nspawn) ------------------------------------------------------------

NSPAWN_ARGS = TRICKY + ["--opt=a b", "100%% literal"]
NSPAWN_ENV = {"A": "x y", "B": 'q"uote', "C": "100%", "D": "$NOT_EXPANDED", "E": "back\\slash"}


def _runtime(top: Path, extra_bins: list[str] = ()) -> None:
    """A container tree that can run POSIX sh scripts: dash as /usr/bin/sh, sleep, the
    libraries they (and extra_bins) need, and the usual /bin, /lib64 links."""
    for d in ("usr/bin", "usr/lib64"):
        (top / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (top / link).symlink_to(target)
    bins = {"/bin/dash": "usr/bin/sh", shutil.which("sleep"): "usr/bin/sleep"}
    bins.update({shutil.which(b): f"usr/bin/{Path(b).name}" for b in extra_bins})
    libs = set()
    for host, inside in bins.items():
        shutil.copy2(host, top / inside)
        out = subprocess.run(["ldd", host], capture_output=True, text=True, check=True).stdout
        libs |= {m.group(1) for m in re.finditer(r"(?:=>\s*)?(/\S+)\s+\(0x", out)}
    for lib in libs:
        real = Path(lib).resolve()
        dest = top / ("usr/lib64/" + Path(lib).name if "ld-linux" in lib else str(real).lstrip("/"))
        if str(real).startswith(("/lib/", "/lib64/")):
            dest = top / "usr" / str(real).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)
        if dest.name != Path(lib).name:
            (dest.parent / Path(lib).name).symlink_to(dest.name)


def _script(top: Path, name: str, body: str) -> None:
    path = top / "usr/bin" / name
    path.write_text("#!/usr/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def nspawn_release(tmp_path):
    """A release with boot-time containers exercising the mapping and the sandbox, for nspawn:
    argv (arguments, environment, user), notify (sd_notify from a child, allowed), plain (binds,
    host network, a read-only device), relaxed (a writable device, realtime), unnotified
    (sd_notify from a child, not allowed), broken (cannot be executed)."""
    imgs = tmp_path / "images"
    argv, notify, plain, relaxed = imgs / "argv", imgs / "notify", imgs / "plain", imgs / "relaxed"
    _runtime(argv)
    _script(argv, "show", 'for a in "$@"; do printf "ARG[%s]\\n" "$a"; done\n'
                          'for v in A B C D E; do eval "printf \\"ENV[%s=%s]\\\\n\\" $v \\"\\$$v\\""; done\n'
                          'while read -r k v rest; do [ "$k" = Uid: ] && echo "UID[$v]"; done </proc/self/status\n'
                          'echo READY-ARGV\n' + PROBE + 'probe\nexec sleep 600\n')
    _runtime(notify, ["systemd-notify"])
    _script(notify, "notifier", "systemd-notify --ready\necho READY-NOTIFY\nexec sleep 600\n")
    _runtime(plain, ["chrt"])
    _script(plain, "plain", '[ -f /etc/host-os-release ] && echo BIND-FILE-OK\n'
                            '[ -d /data/systemd/system ] && echo BIND-DIR-OK\n'
                            '[ -d /tmp ] && [ -d /proc/self ] && echo API-OK\n' + PROBE + 'probe /dev/tun-ro\n'
                            'exec sleep 600\n')
    _runtime(relaxed, ["chrt"])
    broken = imgs / "broken"
    _runtime(broken)
    (broken / "usr/bin/broken").write_text("#!/usr/bin/no-such-interpreter\n")
    (broken / "usr/bin/broken").chmod(0o755)
    _script(relaxed, "relaxed", PROBE + "probe /dev/net/tun\nexec sleep 600\n")
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "hostname").write_text("nspawn-test\n")
    doc = {
        "apiVersion": "bootimg/v1",
        "identity": {"name": "nspawn-test", "version": "1", "source_date_epoch": EPOCH},
        "rootfs": {"source": {"type": "directory", "path": "rootfs"}},
        "containers": [
            {"name": "argv", "image": {"type": "directory", "path": "images/argv"}, "phase": "early",
             "command": ["/usr/bin/show", *NSPAWN_ARGS], "environment": NSPAWN_ENV, "user": "1100:1100",
             "restart": "never", "deadline_ms": 3000},
            {"name": "notify", "image": {"type": "directory", "path": "images/notify"}, "phase": "basic",
             "readiness": "notify", "command": ["notifier"], "restart": "never", "deadline_ms": 3000,
             "ordering": {"after": ["argv"]},
             "sandbox": {"reason": "systemd-notify, a child of the shell script, reports readiness",
                         "notify_access": "all"}},
            {"name": "unnotified", "image": {"type": "directory", "path": "images/notify"}, "readiness": "notify",
             "command": ["notifier"], "restart": "never", "deadline_ms": 1},
            {"name": "broken", "image": {"type": "directory", "path": "images/broken"}, "command": ["/usr/bin/broken"],
             "restart": "never"},
            {"name": "plain", "image": {"type": "directory", "path": "images/plain"}, "command": ["/bin/plain"],
             "network": "host", "restart": "never", "resources": {"cpu_weight": 50, "memory_max_mib": 32},
             "binds": [{"source": "/usr/lib/os-release", "target": "/etc/host-os-release"},
                       {"source": "/usr/lib/systemd", "target": "/data/systemd"},
                       {"source": "/dev/net/tun", "target": "/dev/tun-ro"}]},
            {"name": "relaxed", "image": {"type": "directory", "path": "images/relaxed"}, "command": ["/bin/relaxed"],
             "restart": "never",
             "sandbox": {"reason": "writes to a device node, realtime scheduling",
                         "devices": [{"path": "/dev/net/tun", "access": "rw"}], "realtime_priority": 10}},
        ],
        "integrity": {"trust": "sealed", "fsverity": "optional"},   # this kernel has no fs-verity
    }
    (tmp_path / "m.yaml").write_text(json.dumps(doc))
    out = tmp_path / "out"
    res = run_cli("build", str(tmp_path / "m.yaml"), "-o", str(out), "--no-boot-check")    # nspawn boots no kernel
    assert res.returncode == 0, res.stderr.decode()
    return out


def _host_realtime() -> tuple[bool, bool]:
    """Whether this host lets a service have realtime scheduling at all: (systemd can raise
    RLIMIT_RTPRIO, which takes CAP_SYS_RESOURCE; a cgroup has a realtime budget, which it has
    not with CONFIG_RT_GROUP_SCHED)."""
    raised = subprocess.run(["prlimit", "--rtprio=10:10", "true"], capture_output=True).returncode == 0
    return raised, not any(Path(p).exists() for p in ("/sys/fs/cgroup/cpu/cpu.rt_runtime_us",
                                                       "/sys/fs/cgroup/cpu.rt_runtime_us"))


# What a container's sandbox looks like from inside (POSIX sh, for the nspawn images): its
# capability bounding set, no_new_privs and seccomp state, user namespace map, /proc subset,
# what it may do with the device node $1 and whether it may use realtime scheduling.
PROBE = r"""probe() {
    while read -r k v rest; do
        case $k in CapBnd:|CapEff:|NoNewPrivs:|Seccomp:) echo "STATUS[$k$v]" ;; esac
    done </proc/self/status
    while read -r inside outside count; do echo "UIDMAP[$inside $outside $count]"; done </proc/self/uid_map
    [ -e /proc/sys ] || echo NO-PROC-SYS
    if [ -n "${1:-}" ]; then
        ( : <"$1" ) 2>/dev/null && echo DEV-READ-OK || echo DEV-READ-DENIED
        ( : <>"$1" ) 2>/dev/null && echo DEV-WRITE-OK || echo DEV-WRITE-DENIED
    fi
    while read -r line; do
        case $line in "Max realtime priority"*) set -- $line; echo "RTPRIO[$4 $5]" ;; esac
    done </proc/self/limits
    if command -v chrt >/dev/null; then chrt -f 10 sleep 0 2>/dev/null && echo RT-OK || echo RT-DENIED; fi
}
"""


REPORT = """[Unit]
Description=test report
After=multi-user.target bootimg-containers.target
[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/console
ExecStart=/bin/sh -c 'sleep 1; echo ==REPORT==; for u in argv notify plain relaxed unnotified broken; do \
echo "STATE $u $(systemctl show -p ActiveState --value $u.service) $(systemctl show -p SubState --value $u.service)"; \
journalctl -q --no-pager -o cat _SYSTEMD_UNIT=$u.service | sed "s/^/LOG $u /"; done; echo ==END==; systemctl poweroff'
"""


@requires_root
@pytest.mark.kernel
@pytest.mark.skipif(not (have("systemd-nspawn") and Path("/usr/lib/systemd/systemd").exists()),
                    reason="needs systemd-nspawn and systemd (Debian: systemd-container)")
def test_units_boot_in_nspawn(nspawn_release, tmp_path):
    """Boot systemd 252 in a container whose /usr carries the root image's files (the release's
    root.cfs, mounted, over the host's /usr) and check that the containers run as generated.
    nspawn cannot set up loop devices, so the helper mounts the images on the host first, with
    the arguments its units give it, and the image units are overridden to succeed."""
    out = nspawn_release
    run = tmp_path / "run"
    env = {"BOOTIMG_RELEASE": str(out), "BOOTIMG_RUN": str(run)}
    ns = tmp_path / "ns"
    mounted: list[Path] = []
    names = ("argv", "notify", "plain", "relaxed", "unnotified", "broken")
    with composefs_mount(out / "images" / "root.cfs", out / "objects", tmp_path / "rootimg") as rootimg:
        try:
            for name in names:
                unit = (rootimg / UNIT.lstrip("/") / f"bootimg-image-{name}.service").read_text()
                start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
                args = shlex.split(start[len("ExecStart="):])[2:]      # PROGRAM mount-image ARGS
                res = run_helper(*args, env=env)
                assert res.returncode == 0, res.stderr
                mounted.append(run / "containers" / name)
                dropin = ns / "etc/systemd/system" / f"bootimg-image-{name}.service.d"
                dropin.mkdir(parents=True)
                (dropin / "nspawn.conf").write_text("[Service]\nExecStart=\nExecStart=/bin/true\nExecStop=\n")
            (ns / "sysroot").mkdir()
            # The unified cgroup hierarchy, CAP_BPF and bpf(): the inner systemd enforces
            # DeviceAllow= with a BPF device filter, as PID 1 of the target does (nspawn gives
            # it a read-only v1 devices controller on a hybrid host, and neither CAP_BPF nor bpf()).
            lines, report = nspawn_report(ns, rootimg / "usr", REPORT, (
                "--capability=CAP_BPF", "--system-call-filter=bpf", f"--bind-ro={run}/containers:/run/bootimg/containers"))
        finally:
            for name in names:
                run_helper("--umount", name, env=env)
    for name in names[:-2]:
        assert f"STATE {name} active running" in lines, report
    log = {n: [x[len(f"LOG {n} "):] for x in lines if x.startswith(f"LOG {n} ")] for n in names}
    # Every argument arrived exactly as the manifest wrote it (quoting, %, $, ;, newlines...).
    out = log["argv"]
    first = next(i for i, x in enumerate(out) if x.startswith("ARG["))
    last = next(i for i, x in enumerate(out) if x.startswith("ENV["))
    shown = "\n".join(out[first:last])
    assert shown == "\n".join(f"ARG[{a}]" for a in NSPAWN_ARGS)
    assert [x for x in log["argv"] if x.startswith("ENV[")] == [f"ENV[{k}={v}]" for k, v in NSPAWN_ENV.items()]
    assert "UID[1100]" in log["argv"]                   # the id exists: sysusers made it at boot
    assert "READY-NOTIFY" in log["notify"]              # and sd_notify reached systemd from the chroot
    assert {"BIND-FILE-OK", "BIND-DIR-OK", "API-OK"} <= set(log["plain"])
    # The sandbox, seen from inside: no capabilities, no_new_privs, a seccomp filter, a user
    # namespace mapping only root and the service's user, /proc without its non-process files.
    for name in ("argv", "plain", "relaxed"):
        assert {"STATUS[CapBnd:0000000000000000]", "STATUS[CapEff:0000000000000000]", "STATUS[NoNewPrivs:1]",
                "STATUS[Seccomp:2]", "NO-PROC-SYS"} <= set(log[name]), (name, log[name])
    assert [x for x in log["argv"] if x.startswith("UIDMAP[")] == ["UIDMAP[0 0 1]", "UIDMAP[1100 1100 1]"]
    assert [x for x in log["plain"] if x.startswith("UIDMAP[")] == ["UIDMAP[0 0 1]"]
    # A /dev node bound read-only is readable, not writable (DeviceAllow=... r); sandbox.devices
    # with access rw makes it writable. No realtime scheduling by default; realtime_priority
    # sets the limit (whether the kernel then grants SCHED_FIFO depends on its RT group
    # scheduling: with CONFIG_RT_GROUP_SCHED a cgroup has no realtime budget).
    assert {"DEV-READ-OK", "DEV-WRITE-DENIED", "RT-DENIED", "RTPRIO[0 0]"} <= set(log["plain"])
    assert {"DEV-READ-OK", "DEV-WRITE-OK"} <= set(log["relaxed"])
    raise_rlimit, rt_budget = _host_realtime()
    if raise_rlimit:
        assert "RTPRIO[10 10]" in log["relaxed"]
        if rt_budget:
            assert "RT-OK" in log["relaxed"]
    # sd_notify from a child process is refused unless sandbox.notify_access allows it.
    assert "READY-NOTIFY" in log["unnotified"] and "STATE unnotified failed failed" in lines, report
    # systemd's own words on why a container could not start reach the journal (its exec
    # child logs from inside the container's namespaces, where /dev/kmsg is not)
    assert "STATE broken failed failed" in lines, report
    assert "broken.service: Failed to execute /usr/bin/broken: No such file or directory" in log["broken"], report
