"""Budgets from the manifest -> per-KPI samples, statistics and verdicts; baseline comparison.

Per KPI and boot a *sample*: the milestone the KPI measures, relative to its ``since`` base,
with the milestone's state. Then, over all boots:

* any boot ``not_reached``                      -> ``not_reached`` (a failure: the thing never happened)
* any boot ``not_measurable`` or ``implausible`` -> ``not_measurable`` (we cannot vouch for it)
* one boot above ``max_ms``                     -> ``fail``
* the statistic above ``fail_ms`` / ``warn_ms``  -> ``fail`` / ``warn``, else ``pass``

Exit code: 1 when a KPI failed or was not reached, else 2 when one was not measurable, else 0
(pass or warn). A definite failure wins over a measurement gap: it needs fixing either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..manifest.model import KpiBudget, Manifest
from .collect import unit_milestone
from .model import BootRecord, Value
from .stats import STATISTICS, statistic, summarize

VERDICTS = ("pass", "warn", "fail", "not_reached", "not_measurable")
MEASURE_MILESTONE = {"initrd": "initrd_start", "root_mounted": "root_mounted", "userspace": "userspace_start",
                     "default_target": "default_target", "boot_finished": "boot_finished"}


@dataclass
class Sample:
    boot_id: str | None
    label: str | None
    state: str
    value_ms: float | None
    source: str
    note: str = ""


@dataclass
class KpiResult:
    name: str
    measure: str
    unit: str | None  # the systemd unit, for unit_active
    since: str
    statistic: str
    warn_ms: int
    fail_ms: int
    max_ms: int | None
    verdict: str
    value_ms: float | None  # the judged statistic
    message: str
    stats: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    readiness: str | None = None  # the unit's Type= (what "active" means for it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KpiResult":
        d = dict(d)
        d["samples"] = [Sample(**s) for s in d.get("samples", [])]
        return cls(**d)

    @property
    def sources(self) -> list[str]:
        return sorted({s.source for s in self.samples})


def milestone_for(record: BootRecord, budget: KpiBudget, manifest: Manifest | None) -> tuple[Value, str | None]:
    """The milestone (on the record's clock) a KPI measures in one boot, and its unit."""
    if budget.measure == "unit_active":
        assert budget.unit is not None
        unit = manifest.unit_name(budget.unit) if manifest is not None else (
            budget.unit if "." in budget.unit else f"{budget.unit}.service")
        u = record.units.get(unit)
        if u is None:
            return Value("not_measurable", None, record.clock, f"dbus:{unit}", f"{unit} was not collected"), unit
        return unit_milestone(u, record.clock, journal=record.source.startswith("journal")), unit
    name = MEASURE_MILESTONE[budget.measure]
    v = record.milestones.get(name)
    if v is None:
        return Value("not_measurable", None, record.clock, record.source, f"milestone {name} not in the record"), None
    return v, None


def hook_sample(record: BootRecord) -> Sample:
    """``root_hook``: the initramfs hook's own time, bootimg-root.service started -> done, both
    from the boot's journal (the manager forgets initrd units at switch-root)."""
    start, done = record.milestones.get("root_hook_start"), record.milestones.get("root_mounted")
    if start is None or done is None or start.state != "ok" or done.state != "ok" or "journal" not in done.source:
        return Sample(record.boot_id, record.label, "not_measurable", None, "journal:bootimg-root.service",
                      "the hook's start and end come from the boot's journal (kpi run reads it; kpi collect --history)")
    src = f"{done.source} - {start.source}"
    ms = round((done.usec - start.usec) / 1000.0, 3)
    if ms < 0:
        return Sample(record.boot_id, record.label, "implausible", ms, src, "done before started")
    return Sample(record.boot_id, record.label, "ok", ms, src)


def sample(record: BootRecord, budget: KpiBudget, manifest: Manifest | None) -> tuple[Sample, str | None]:
    """One boot's value of a KPI in ms since the KPI's base, with its state and provenance."""
    if budget.measure == "root_hook":
        return hook_sample(record), None
    v, unit = milestone_for(record, budget, manifest)
    mk = lambda state, ms, note, src=v.source: Sample(record.boot_id, record.label, state, ms, src, note)  # noqa: E731
    if v.state != "ok":
        ms = None if v.usec is None else round(v.usec / 1000.0, 3)
        return mk(v.state, ms, v.note), unit
    assert v.usec is not None
    if budget.since == "power_on":
        return mk("not_measurable", None, "power_on needs an external anchor (rig power-on time); "
                                          "the target's clocks start at kernel start"), unit
    if budget.since == "kernel_start":
        if record.clock != "target":
            return mk("not_measurable", None, "container: no kernel start of its own (its clock is the host's); "
                                              "measure since userspace_start"), unit
        return mk("ok", round(v.usec / 1000.0, 3), v.note), unit
    # userspace_start
    if record.userspace_usec is None:
        return mk("not_measurable", None, "no userspace start in this boot"), unit
    delta = v.usec - record.userspace_usec
    src = f"{v.source} - Manager.UserspaceTimestampMonotonic"
    if delta < 0:
        return mk("implausible", round(delta / 1000.0, 3), "before userspace start", src), unit
    return mk("ok", round(delta / 1000.0, 3), v.note, src), unit


def judge_kpi(budget: KpiBudget, records: Sequence[BootRecord], manifest: Manifest | None) -> KpiResult:
    samples, unit = [], None
    for r in records:
        s, unit = sample(r, budget, manifest)
        samples.append(s)
    readiness = None
    if unit:
        types = {r.units[unit].type for r in records if unit in r.units and r.units[unit].type}
        readiness = ", ".join(sorted(types)) or None
    values = [s.value_ms for s in samples if s.state == "ok" and s.value_ms is not None]
    stats = summarize(values)
    res = KpiResult(name=budget.name, measure=budget.measure, unit=unit, since=budget.since,
                    statistic=budget.statistic, warn_ms=budget.warn_ms, fail_ms=budget.fail_ms,
                    max_ms=budget.max_ms, verdict="pass", value_ms=None, message="", stats=stats,
                    samples=samples, readiness=readiness)
    n = len(samples)
    what = f"{budget.measure}" + (f"({unit})" if unit else "") + f" since {budget.since}"
    bad = lambda state: [s for s in samples if s.state == state]  # noqa: E731
    if n == 0:
        res.verdict, res.message = "not_measurable", f"{what}: no boots measured"
        return res
    if bad("not_reached"):
        miss = bad("not_reached")
        res.verdict = "not_reached"
        res.message = (f"{what} not reached in {len(miss)} of {n} boots (boot {_boot(miss[0])}: {miss[0].note}; "
                       f"source={miss[0].source})")
        return res
    gaps = bad("not_measurable") + bad("implausible")
    if gaps:
        res.verdict = "not_measurable"
        res.message = (f"{what} not measurable in {len(gaps)} of {n} boots (boot {_boot(gaps[0])}: "
                       f"{gaps[0].state}: {gaps[0].note}; source={gaps[0].source})")
        return res
    value = statistic(values, budget.statistic)
    res.value_ms = round(value, 3)
    src = ", ".join(res.sources)
    stat = f"{budget.statistic}({budget.name})={value / 1000:.3f}s"
    if budget.max_ms is not None:
        over = [s for s in samples if s.value_ms is not None and s.value_ms > budget.max_ms]
        if over:
            worst = max(over, key=lambda s: s.value_ms or 0)
            res.verdict = "fail"
            res.message = (f"{budget.name}: boot {_boot(worst)} took {worst.value_ms / 1000:.3f}s > per-boot limit "
                           f"max_ms {budget.max_ms / 1000:.3f}s ({len(over)} of {n} boots over; {stat}; "
                           f"source={worst.source})")
            return res
    if value > budget.fail_ms:
        res.verdict = "fail"
        res.message = f"{stat} > fail budget {budget.fail_ms / 1000:.3f}s (n={n}, source={src})"
    elif value > budget.warn_ms:
        res.verdict = "warn"
        res.message = f"{stat} > warn budget {budget.warn_ms / 1000:.3f}s (fail {budget.fail_ms / 1000:.3f}s; n={n}, source={src})"
    else:
        res.message = f"{stat} <= warn budget {budget.warn_ms / 1000:.3f}s (n={n}, source={src})"
    return res


def _boot(s: Sample) -> str:
    bid = (s.boot_id or "?")[:12]
    return f"{bid} ({s.label})" if s.label else bid


def judge(records: Sequence[BootRecord], budgets: Sequence[KpiBudget], manifest: Manifest | None) -> list[KpiResult]:
    return [judge_kpi(b, records, manifest) for b in budgets]


def exit_code(results: Sequence[KpiResult]) -> int:
    verdicts = {r.verdict for r in results}
    if verdicts & {"fail", "not_reached"}:
        return 1
    if "not_measurable" in verdicts:
        return 2
    return 0


def overall(results: Sequence[KpiResult]) -> str:
    for v in ("fail", "not_reached", "not_measurable", "warn"):
        if any(r.verdict == v for r in results):
            return v
    return "pass"


# -- baseline comparison ----------------------------------------------------------------------

@dataclass
class Delta:
    name: str
    statistic: str
    current_ms: float | None
    baseline_ms: float | None
    delta_ms: float | None
    delta_rel: float | None
    flag: str  # regression | improvement | same | missing
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(current: Sequence[KpiResult], baseline: Sequence[KpiResult], *, rel: float = 0.10,
            abs_ms: float = 50.0) -> list[Delta]:
    """Deltas of each KPI's judged statistic (computed on both sides' raw samples). A change is a
    regression/improvement only when it exceeds BOTH ``abs_ms`` and ``rel`` (a fraction of the baseline)."""
    base = {r.name: r for r in baseline}
    out = []
    for cur in current:
        b = base.get(cur.name)
        cv = _stat_of(cur, cur.statistic)
        bv = _stat_of(b, cur.statistic) if b is not None else None
        if cv is None or bv is None:
            side = "baseline" if bv is None else "current"
            out.append(Delta(cur.name, cur.statistic, cv, bv, None, None, "missing",
                             f"{cur.name}: no {cur.statistic} in the {side} result"))
            continue
        d = cv - bv
        r = d / bv if bv else (0.0 if d == 0 else float("inf"))
        if d > abs_ms and r > rel:
            flag = "regression"
        elif -d > abs_ms and -r > rel:
            flag = "improvement"
        else:
            flag = "same"
        out.append(Delta(cur.name, cur.statistic, round(cv, 3), round(bv, 3), round(d, 3),
                         round(r, 4) if r != float("inf") else None, flag,
                         f"{cur.statistic}({cur.name}) {bv / 1000:.3f}s -> {cv / 1000:.3f}s "
                         f"({d:+.0f} ms, {r * 100:+.1f}%; thresholds {abs_ms:.0f} ms and {rel * 100:.0f}%)"))
    return out


def _stat_of(r: KpiResult | None, name: str) -> float | None:
    if r is None:
        return None
    values = [s.value_ms for s in r.samples if s.state == "ok" and s.value_ms is not None]
    if not values or len(values) != len(r.samples):
        return None
    return statistic(values, name)


assert set(STATISTICS) >= {"median", "p90", "p95", "max"}
