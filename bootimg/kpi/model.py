"""What one boot looked like: phases, milestones and units, each number with an explicit state.

Every measured number is a ``Value``: a state (``ok``, ``not_reached``, ``not_measurable``,
``implausible``), the value in microseconds when there is one, the clock it is read on, and
where it came from (``source``). There is never a silent zero: a timestamp of 0 is "not
reached" or "not measurable", never "fast".

Clocks (``clock``):

* ``target``: the board's CLOCK_MONOTONIC; zero is kernel timekeeping start ("kernel start").
* ``host``: a container's timestamps, which are the host's CLOCK_MONOTONIC (the container has
  no kernel start of its own); only differences to its userspace start mean anything.
* ``span``: a duration (a phase), not a point in time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

State = Literal["ok", "not_reached", "not_measurable", "implausible"]
STATES: tuple[str, ...] = ("ok", "not_reached", "not_measurable", "implausible")
Clock = Literal["target", "host", "span"]

USEC_INFINITY = 2**64 - 1
# A boot phase or milestone beyond an hour is a wrapped or bogus timestamp (cf. systemd#17191's
# "584542y"), not a slow boot.
ABSURD_USEC = 3600 * 1_000_000

# The milestones every record has, in boot order.
MILESTONES: tuple[str, ...] = ("initrd_start", "root_mounted", "switch_root", "userspace_start", "default_target",
                               "boot_finished")
PHASES: tuple[str, ...] = ("firmware", "loader", "kernel", "initrd", "userspace", "total")


def timestamp_is_set(usec: int | None) -> bool:
    """systemd's timestamp_is_set(): neither 0 nor USEC_INFINITY."""
    return usec is not None and 0 < usec < USEC_INFINITY


@dataclass(frozen=True)
class Value:
    """One number with its state and provenance. ``usec`` is set for ``ok`` and ``implausible``."""

    state: State
    usec: int | None
    clock: Clock
    source: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @property
    def ms(self) -> float | None:
        return None if self.usec is None else self.usec / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v != "" or k != "note"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Value":
        return cls(d["state"], d.get("usec"), d["clock"], d["source"], d.get("note", ""))


def ok(usec: int, clock: Clock, source: str, note: str = "") -> Value:
    """``usec`` if it is plausible (0 <= usec <= an hour), else an ``implausible`` value."""
    if usec < 0:
        return Value("implausible", usec, clock, source, f"negative ({usec} us)" + (f"; {note}" if note else ""))
    if usec > ABSURD_USEC:
        return Value("implausible", usec, clock, source, f"absurd ({usec / 1e6:.0f} s)" + (f"; {note}" if note else ""))
    return Value("ok", usec, clock, source, note)


def not_reached(clock: Clock, source: str, note: str) -> Value:
    return Value("not_reached", None, clock, source, note)


def not_measurable(clock: Clock, source: str, note: str) -> Value:
    return Value("not_measurable", None, clock, source, note)


@dataclass(frozen=True)
class UnitRecord:
    """What the manager says about one unit (timestamps: monotonic µs on the record's clock, 0 = never)."""

    name: str
    id: str
    load_state: str
    active_state: str
    sub_state: str
    result: str | None  # services, mounts, ...; None for targets
    type: str | None  # readiness semantics: a service's Type= (notify: READY=1, exec: exec'd, ...)
    activating_usec: int  # InactiveExitTimestampMonotonic
    active_usec: int  # ActiveEnterTimestampMonotonic
    exec_main_start_usec: int  # ExecMainStartTimestampMonotonic (services), else 0
    deactivated_usec: int  # InactiveEnterTimestampMonotonic
    condition_result: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnitRecord":
        return cls(**d)


@dataclass
class BootRecord:
    """One boot as collected: identity, context, phases, milestones, units, and the raw properties."""

    boot_id: str | None
    source: str  # how it was collected: "pystemd:address unix:path=...", "journal:-D DIR", ...
    clock: Clock  # the clock of every milestone: "target" (a real boot) or "host" (a container)
    system: dict[str, Any]  # systemd version, virtualization, architecture, kernel cmdline, ...
    booted: dict[str, Any] | None  # /run/bootimg/booted.json: which image booted, verity
    phases: dict[str, Value]
    milestones: dict[str, Value]  # monotonic µs on ``clock`` (not relative to any base)
    units: dict[str, UnitRecord]
    userspace_usec: int | None  # UserspaceTimestampMonotonic: the base of "since userspace_start"
    analyze_time: str | None  # the text `systemd-analyze time` prints for these numbers
    label: str | None = None  # first | cold | warm (set by `kpi run`)
    collected_at: str | None = None  # host wall clock, ISO 8601
    collect_seconds: float | None = None
    properties: dict[str, Any] = field(default_factory=dict)  # the raw property set it came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id, "label": self.label, "source": self.source, "clock": self.clock,
            "collected_at": self.collected_at, "collect_seconds": self.collect_seconds,
            "system": self.system, "booted": self.booted,
            "phases": {k: v.to_dict() for k, v in self.phases.items()},
            "milestones": {k: v.to_dict() for k, v in self.milestones.items()},
            "userspace_usec": self.userspace_usec, "analyze_time": self.analyze_time,
            "units": {k: u.to_dict() for k, u in self.units.items()},
            "properties": self.properties,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BootRecord":
        return cls(
            boot_id=d.get("boot_id"), source=d["source"], clock=d["clock"], system=d.get("system", {}),
            booted=d.get("booted"), phases={k: Value.from_dict(v) for k, v in d["phases"].items()},
            milestones={k: Value.from_dict(v) for k, v in d["milestones"].items()},
            units={k: UnitRecord.from_dict(u) for k, u in d.get("units", {}).items()},
            userspace_usec=d.get("userspace_usec"), analyze_time=d.get("analyze_time"), label=d.get("label"),
            collected_at=d.get("collected_at"), collect_seconds=d.get("collect_seconds"),
            properties=d.get("properties", {}))

    @property
    def image_digest(self) -> str | None:
        return (self.booted or {}).get("digest")
