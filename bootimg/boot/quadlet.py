"""Podman quadlet ``.container`` files: a static check, since no quadlet runs here.

Debian bookworm's podman (4.3) has no quadlet generator, so the ``.container`` files bootimg
ships (``/usr/share/containers/systemd/NAME.container``, see units.py) cannot be run through
``podman-system-generator --dryrun`` on the build host. Instead :func:`check_container`
parses them with the unit-file syntax quadlet uses and applies the checks quadlet's
converter applies before it writes a service:

- every group is one quadlet knows (``[Container]``, ``[Quadlet]``) or passes to systemd
  (``[Unit]``, ``[Service]``, ``[Install]``), or an ``X-`` extension group;
- every ``[Container]`` and ``[Quadlet]`` key is in the list below (quadlet fails the whole
  file with "unsupported key 'K' in group 'G'" otherwise); ``[Install]`` holds only the keys
  the generator applies;
- exactly one of ``Image=`` and ``Rootfs=``; ``Group=`` only with ``User=``; ``[Service]``
  ``Type=`` only ``notify`` or ``oneshot`` and ``KillMode=`` only ``mixed`` or
  ``control-group``; booleans are booleans.

``[Unit]`` and ``[Service]`` go to systemd untouched; :func:`approximate_service` turns a
``.container`` into the service quadlet would make from it (ExecStart reduced to
``podman run --rootfs``), so ``systemd-analyze verify`` checks those sections too.

The key lists are those of podman-systemd.unit(5) and ``pkg/systemd/quadlet/quadlet.go``
(``groupsInfo[ContainerGroup].SupportedKeys``, ``supportedQuadletKeys``) of
containers/podman at commit 00b40dba52da73ab66e62edd8b5f57d77692caaf, a podman 5.3
development snapshot (it has ``HealthLogDestination``, ``StartWithPod`` and the
``[Quadlet]`` group). Older podman accepts fewer keys: :data:`EMITTED_KEYS_SINCE` records,
for each key bootimg writes, the first podman release that accepts it, so the files need
podman >= 4.5 (``Rootfs=``, podman PR #17352, merged 2023-02 after 4.4 had branched), 4.6
when ``WorkingDir=`` is written, 4.7 with ``Ulimit=`` (a realtime priority); each file's header
says which. The 4.4 to 4.7 entries agree with containers/podlet's per-release option lists
(``src/quadlet/container.rs``, ``remove_v4_*_options``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# podman-systemd.unit(5) / quadlet.go at containers/podman@00b40dba52da (5.3 development line).
PODMAN_REFERENCE = "podman-systemd.unit(5), containers/podman@00b40dba52da (5.3 development line)"

CONTAINER_KEYS = frozenset({
    "AddCapability", "AddDevice", "AddHost", "Annotation", "AutoUpdate", "CgroupsMode",
    "ContainerName", "ContainersConfModule", "DNS", "DNSOption", "DNSSearch", "DropCapability",
    "Entrypoint", "Environment", "EnvironmentFile", "EnvironmentHost", "Exec", "ExposeHostPort",
    "GIDMap", "GlobalArgs", "Group", "GroupAdd", "HealthCmd", "HealthInterval",
    "HealthLogDestination", "HealthMaxLogCount", "HealthMaxLogSize", "HealthOnFailure",
    "HealthRetries", "HealthStartPeriod", "HealthStartupCmd", "HealthStartupInterval",
    "HealthStartupRetries", "HealthStartupSuccess", "HealthStartupTimeout", "HealthTimeout",
    "HostName", "IP", "IP6", "Image", "Label", "LogDriver", "LogOpt", "Mask", "Memory", "Mount",
    "Network", "NetworkAlias", "NoNewPrivileges", "Notify", "PidsLimit", "Pod", "PodmanArgs",
    "PublishPort", "Pull", "ReadOnly", "ReadOnlyTmpfs", "ReloadCmd", "ReloadSignal", "RemapGid",
    "RemapUid", "RemapUidSize", "RemapUsers", "Retry", "RetryDelay", "Rootfs", "RunInit",
    "SeccompProfile", "Secret", "SecurityLabelDisable", "SecurityLabelFileType",
    "SecurityLabelLevel", "SecurityLabelNested", "SecurityLabelType", "ServiceName", "ShmSize",
    "StartWithPod", "StopSignal", "StopTimeout", "SubGIDMap", "SubUIDMap", "Sysctl", "Timezone",
    "Tmpfs", "UIDMap", "Ulimit", "Unmask", "User", "UserNS", "VolatileTmp", "Volume", "WorkingDir",
})
QUADLET_KEYS = frozenset({"DefaultDependencies"})
# "Currently, only the Alias, WantedBy, RequiredBy, and UpheldBy keys are supported" (plus
# DefaultInstance for templates).
INSTALL_KEYS = frozenset({"Alias", "WantedBy", "RequiredBy", "UpheldBy", "DefaultInstance"})
PASSED_GROUPS = frozenset({"Unit", "Service", "Install"})
GROUPS = PASSED_GROUPS | {"Container", "Quadlet"}
BOOLEAN_KEYS = frozenset({"ReadOnly", "NoNewPrivileges", "RunInit", "EnvironmentHost", "ReadOnlyTmpfs",
                          "SecurityLabelDisable", "SecurityLabelNested", "VolatileTmp", "StartWithPod"})

# The podman release that first accepts each key bootimg writes (group, key) -> (major, minor).
# An older quadlet rejects the file; [Quadlet] is ignored by podman < 5.3 only as an unknown
# section of the generated service (systemd warns once), so it is not a hard requirement.
EMITTED_KEYS_SINCE = {
    ("Container", "Rootfs"): (4, 5),
    ("Container", "ReadOnly"): (4, 4),
    ("Container", "NoNewPrivileges"): (4, 4),
    ("Container", "Exec"): (4, 4),
    ("Container", "Environment"): (4, 4),
    ("Container", "User"): (4, 4),
    ("Container", "Group"): (4, 4),
    ("Container", "Network"): (4, 4),
    ("Container", "Notify"): (4, 4),
    ("Container", "Volume"): (4, 4),
    ("Container", "WorkingDir"): (4, 6),          # podman PR #18838, 2023-06
    ("Container", "DropCapability"): (4, 4),
    ("Container", "AddCapability"): (4, 4),
    ("Container", "AddDevice"): (4, 4),
    ("Container", "Ulimit"): (4, 7),
    ("Quadlet", "DefaultDependencies"): (5, 3),
}


def min_podman(groups: dict[str, list[str]]) -> tuple[int, int]:
    """The oldest podman whose quadlet accepts every [Container] key in ``groups``
    ({group: [keys]}), from EMITTED_KEYS_SINCE."""
    return max((EMITTED_KEYS_SINCE[("Container", k)] for k in groups.get("Container", ())), default=(4, 4))

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}
_SECTION = re.compile(r"^\[([^\[\]]+)\]$")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Entry:
    group: str
    key: str
    value: str
    line: int


@dataclass
class ParsedUnit:
    entries: list[Entry]
    groups: list[tuple[str, int]]   # in file order, with their line
    problems: list[tuple[int, str]]

    def values(self, group: str, key: str) -> list[str]:
        return [e.value for e in self.entries if e.group == group and e.key == key]

    def last(self, group: str, key: str) -> str | None:
        found = self.values(group, key)
        return found[-1] if found else None


def parse_unit(text: str) -> ParsedUnit:
    """Split unit-file text into (group, key, value, line) entries, the way systemd and
    quadlet's parser do: ``#``/``;`` comments, ``[Group]`` headers, ``Key=Value`` with
    whitespace around ``=`` dropped, a trailing backslash continuing the line."""
    entries: list[Entry] = []
    groups: list[tuple[str, int]] = []
    problems: list[tuple[int, str]] = []
    group: str | None = None
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if nxt[:1] in ("#", ";"):
                continue  # comments inside a continuation are skipped, as systemd does
            line = line[:-1] + " " + nxt
        m = _SECTION.match(line)
        if m:
            group = m.group(1)
            groups.append((group, number))
            continue
        if group is None:
            problems.append((number, "assignment outside of any group"))
            continue
        if "=" not in line:
            problems.append((number, f"not an assignment: {line!r}"))
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            problems.append((number, f"invalid key {key!r}"))
            continue
        entries.append(Entry(group, key, value.strip(), number))
    return ParsedUnit(entries, groups, problems)


def check_container(text: str, filename: str = "container") -> list[str]:
    """Every problem quadlet (podman 5.3) would reject this ``.container`` file for, as
    ``FILE:LINE: message`` lines; empty when the file is acceptable."""
    unit = parse_unit(text)
    out = [f"{filename}:{line}: {msg}" for line, msg in unit.problems]
    seen_groups = set()
    for group, line in unit.groups:
        if group not in GROUPS and not group.startswith("X-"):
            out.append(f"{filename}:{line}: unknown group [{group}] (quadlet knows "
                       f"{', '.join(sorted(GROUPS))} and X- extension groups)")
        seen_groups.add(group)
    if "Container" not in seen_groups:
        out.append(f"{filename}:1: no [Container] group")
    allowed = {"Container": CONTAINER_KEYS, "Quadlet": QUADLET_KEYS, "Install": INSTALL_KEYS}
    for e in unit.entries:
        keys = allowed.get(e.group)
        if keys is not None and e.key not in keys:
            out.append(f"{filename}:{e.line}: unsupported key '{e.key}' in group '{e.group}' "
                       f"(not in {PODMAN_REFERENCE})")
        if e.group in ("Container", "Quadlet") and (e.key in BOOLEAN_KEYS or e.key == "DefaultDependencies") \
                and e.value.lower() not in _TRUE | _FALSE:
            out.append(f"{filename}:{e.line}: {e.key}={e.value}: not a boolean")
    image, rootfs = unit.last("Container", "Image"), unit.last("Container", "Rootfs")
    if not image and not rootfs:
        out.append(f"{filename}:1: no Image or Rootfs key specified")
    elif image and rootfs:
        out.append(f"{filename}:1: the Image and Rootfs keys conflict (give only one)")
    if unit.last("Container", "Group") and not unit.last("Container", "User"):
        out.append(f"{filename}:1: invalid Group set without User")
    notify = unit.last("Container", "Notify")
    if notify is not None and notify.lower() not in _TRUE | _FALSE | {"healthy"}:
        out.append(f"{filename}:1: Notify={notify}: not a boolean or 'healthy'")
    kind = unit.last("Service", "Type")
    if kind is not None and kind not in ("notify", "oneshot"):
        out.append(f"{filename}:1: invalid service Type '{kind}' (quadlet allows notify and oneshot)")
    kill = unit.last("Service", "KillMode")
    if kill is not None and kill not in ("mixed", "control-group"):
        out.append(f"{filename}:1: invalid KillMode '{kill}' (quadlet allows mixed and control-group)")
    return out


def approximate_service(text: str, podman: str = "/usr/bin/podman") -> str:
    """The service quadlet would generate from a ``.container`` file, as far as systemd sees
    it: [Unit], [Service] and [Install] as written, plus what quadlet adds to [Service]
    (Type=notify unless oneshot, NotifyAccess=all, KillMode=mixed, Delegate=yes,
    Environment=PODMAN_SYSTEMD_UNIT=%n) and an ExecStart that runs ``podman run --rootfs``
    with the Exec= words. The podman arguments are not reproduced; the point is to let
    ``systemd-analyze verify`` check the sections that pass to systemd unchanged."""
    unit = parse_unit(text)
    lines: list[str] = []
    for group in ("Unit", "Service", "Install"):
        entries = [e for e in unit.entries if e.group == group]
        if not entries and group != "Service":
            continue
        lines.append(f"[{group}]")
        lines.extend(f"{e.key}={e.value}" for e in entries)
        if group == "Service":
            if unit.last("Service", "Type") is None:
                lines += ["Type=notify", "NotifyAccess=all"]
            if unit.last("Service", "KillMode") is None:
                lines.append("KillMode=mixed")
            lines += ["Delegate=yes", "Environment=PODMAN_SYSTEMD_UNIT=%n", "SyslogIdentifier=%N"]
            rootfs = unit.last("Container", "Rootfs") or ""
            exec_words = unit.last("Container", "Exec") or ""
            lines.append(f"ExecStart={podman} run --name systemd-%N --replace --rm --cgroups=split "
                         f"--rootfs {rootfs} {exec_words}".rstrip())
        lines.append("")
    return "\n".join(lines)
