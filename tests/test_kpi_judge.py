"""Statistics, verdicts, exit codes, baseline comparison and the rendered reports."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_cli

from bootimg.kpi.collect import collect
from bootimg.kpi.judge import compare, exit_code, judge
from bootimg.kpi.model import Value
from bootimg.kpi.report import build_report, render_html, render_junit, render_markdown
from bootimg.kpi.report.document import load_report
from bootimg.kpi.stats import percentile, summarize
from bootimg.kpi.transport import RecordedTransport
from bootimg.manifest import load_manifest
from bootimg.manifest.model import KpiBudget

DATA = Path(__file__).parent / "data" / "kpi"


# -- statistics -------------------------------------------------------------------------------

def test_percentiles_are_type7_linear():
    xs = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert percentile(xs, 50) == 5.5
    assert percentile(xs, 90) == pytest.approx(9.1)  # numpy.percentile(xs, 90)
    assert percentile(xs, 95) == pytest.approx(9.55)
    assert percentile([42], 95) == 42
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def test_summary():
    s = summarize([100.0, 200.0, 300.0])
    assert s == {"n": 3, "min": 100.0, "median": 200.0, "mean": 200.0, "p90": pytest.approx(280.0),
                 "p95": pytest.approx(290.0), "max": 300.0, "stdev": pytest.approx(100.0)}
    assert summarize([5.0])["stdev"] is None  # sample stdev needs two values
    assert summarize([])["n"] == 0 and summarize([])["median"] is None


# -- verdicts on boots replayed from a real container boot ------------------------------------

def boots(n: int = 3, shift_ms: float = 0.0):
    """n records of the recorded container boot, the later ones shifted by shift_ms each."""
    out = []
    with RecordedTransport(DATA / "container-nspawn.json") as t:
        for i in range(n):
            r = collect(t, ["ssh.service", "kpi-broken.service", "missing.service"], label="first" if i == 0 else "cold")
            r.boot_id = f"{i:032x}"
            delta = int(i * shift_ms * 1000)
            r.milestones = {k: dataclasses.replace(v, usec=v.usec + delta) if v.usec is not None else v
                            for k, v in r.milestones.items()}
            for u in r.units.values():
                object.__setattr__(u, "active_usec", u.active_usec + delta if u.active_usec else 0)
            out.append(r)
    return out


def budget(**kw) -> KpiBudget:
    base = dict(name="k", measure="default_target", since="userspace_start", statistic="max",
                warn_ms=20000, fail_ms=30000)
    base.update(kw)
    return KpiBudget(**base)


def one(b: KpiBudget, records=None):
    return judge(records or boots(), [b], None)[0]


def test_pass_warn_fail_on_the_statistic():
    recs = boots()
    value = one(budget(), recs).value_ms
    assert 100 < value < 5000  # default.target after userspace start, ms
    assert one(budget(warn_ms=int(value) + 1, fail_ms=int(value) + 2), recs).verdict == "pass"
    w = one(budget(warn_ms=int(value) - 1, fail_ms=int(value) + 2), recs)
    assert w.verdict == "warn" and "warn budget" in w.message
    f = one(budget(warn_ms=1, fail_ms=int(value) - 1), recs)
    assert f.verdict == "fail"
    assert f.message.startswith(f"max(k)={value / 1000:.3f}s > fail budget")
    assert "source=dbus:default.target.ActiveEnterTimestampMonotonic - Manager.UserspaceTimestampMonotonic" in f.message
    assert exit_code([w]) == 0 and exit_code([f]) == 1


def test_per_boot_hard_limit_names_the_boot():
    recs = boots(3, shift_ms=500)  # the third boot is 1 s later
    base = one(budget(statistic="median"), recs).stats["min"]
    r = one(budget(statistic="median", max_ms=int(base + 700)), recs)
    assert r.verdict == "fail" and f"boot {2:032x}"[:17] in r.message and "per-boot limit" in r.message


def test_statistics_and_samples_are_reported():
    r = one(budget(statistic="p95"), boots(3, shift_ms=100))
    assert r.stats["n"] == 3 and r.stats["max"] - r.stats["min"] == pytest.approx(200, abs=0.01)
    assert [s.label for s in r.samples] == ["first", "cold", "cold"]
    assert all(s.state == "ok" and s.source.startswith("dbus:") for s in r.samples)


def test_unit_not_reached_fails_with_exit_1():
    r = one(budget(measure="unit_active", unit="kpi-broken.service"))
    assert r.verdict == "not_reached"
    assert "ActiveState=failed, Result=exit-code" in r.message
    missing = one(budget(measure="unit_active", unit="missing.service"))
    assert missing.verdict == "not_reached" and "not loaded" in missing.message
    assert exit_code([r]) == 1


def test_not_measurable_exits_2():
    # A container has no kernel start: a KPI since kernel_start cannot be measured there.
    r = one(budget(since="kernel_start"))
    assert r.verdict == "not_measurable" and "container" in r.message
    assert exit_code([r]) == 2
    p = one(budget(since="power_on"))
    assert p.verdict == "not_measurable" and "external anchor" in p.message
    assert one(budget(measure="root_mounted")).verdict == "not_measurable"
    assert exit_code([r, one(budget(warn_ms=1, fail_ms=2))]) == 1  # a definite failure wins


def test_implausible_sample_is_not_measurable_not_fast():
    recs = boots()
    v = recs[1].milestones["boot_finished"]
    recs[1].milestones["boot_finished"] = Value("implausible", -5, v.clock, v.source, "negative")
    r = one(budget(measure="boot_finished"), recs)
    assert r.verdict == "not_measurable" and "implausible" in r.message


def test_no_boots_is_not_measurable():
    assert judge([], [budget()], None)[0].verdict == "not_measurable"


def test_manifest_budgets_and_container_units():
    m = load_manifest(DATA / "container.yaml")
    results = judge(boots(), m.all_budgets(), m)
    assert [r.name for r in results] == ["sshd-up", "userspace-boot", "boot-finished"]
    assert all(r.verdict == "pass" for r in results)
    assert results[0].unit == "ssh.service" and results[0].readiness == "notify"


# -- comparison -------------------------------------------------------------------------------

def test_compare_needs_both_thresholds():
    cur, base = boots(3, shift_ms=0), boots(3, shift_ms=0)
    b = [budget(statistic="median")]
    same = compare(judge(cur, b, None), judge(base, b, None), rel=0.1, abs_ms=50)[0]
    assert same.flag == "same" and same.delta_ms == 0
    later = boots(3)
    for r in later:  # 300 ms later in every boot
        r.milestones["default_target"] = dataclasses.replace(r.milestones["default_target"],
                                                             usec=r.milestones["default_target"].usec + 300_000)
    d = compare(judge(later, b, None), judge(base, b, None), rel=0.1, abs_ms=50)[0]
    assert d.flag == "regression" and d.delta_ms == pytest.approx(300, abs=0.01)
    # over the absolute threshold but not the relative one: not a regression
    assert compare(judge(later, b, None), judge(base, b, None), rel=5.0, abs_ms=50)[0].flag == "same"
    assert compare(judge(base, b, None), judge(later, b, None), rel=0.1, abs_ms=50)[0].flag == "improvement"


# -- reports ----------------------------------------------------------------------------------

@pytest.fixture
def report_doc():
    m = load_manifest(DATA / "container.yaml")
    tight = KpiBudget(name="too-tight", measure="boot_finished", since="userspace_start", statistic="p95",
                      warn_ms=1, fail_ms=2)
    return build_report(boots(), m, m.all_budgets() + (tight,))


def test_json_report_is_the_source_of_truth(report_doc, tmp_path):
    doc = json.loads(json.dumps(report_doc))
    assert doc["schema"] == "bootimg.kpi.report/1"
    assert doc["verdict"] == "fail" and doc["exit_code"] == 1
    assert doc["manifest"]["name"] == "kpi-container" and len(doc["manifest"]["sha256"]) == 64
    assert [b["name"] for b in doc["budgets"]] == ["sshd-up", "userspace-boot", "boot-finished", "too-tight"]
    assert len(doc["boots"]) == 3 and doc["boots"][0]["properties"]["manager"]["Version"].startswith("252")
    k = doc["kpis"][0]
    assert len(k["samples"]) == 3 and all(s["source"] for s in k["samples"])
    assert "percentile_method" in doc and "Hyndman-Fan type 7" in doc["percentile_method"]
    p = tmp_path / "r.json"
    from bootimg.kpi.report import report_bytes

    p.write_bytes(report_bytes(report_doc))
    assert [r.verdict for r in load_report(p)["_results"]] == ["pass", "pass", "pass", "fail"]


def test_junit_one_testcase_per_kpi_failure_names_everything(report_doc):
    root = ET.fromstring(render_junit(report_doc))
    assert root.tag == "testsuite" and root.get("tests") == "4" and root.get("failures") == "1"
    cases = root.findall("testcase")
    assert [c.get("name") for c in cases] == ["sshd-up", "userspace-boot", "boot-finished", "too-tight"]
    failure = cases[3].find("failure")
    msg = failure.get("message")
    assert msg.startswith("p95(too-tight)=") and "> fail budget 0.002s" in msg
    assert "n=3" in msg and "source=dbus:Manager.FinishTimestampMonotonic" in msg
    assert cases[0].find("failure") is None


def test_markdown_and_html(report_doc):
    md = render_markdown(report_doc)
    assert "| too-tight |" in md and "**FAIL**" in md and "Startup finished in" in md
    html = render_html(report_doc)
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 1 + 4  # timeline + a strip per KPI
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert "<script" not in html


# -- the command line -------------------------------------------------------------------------

def test_cli_report_and_compare(tmp_path):
    col = tmp_path / "boots.json"
    r = run_cli("kpi", "collect", "--recorded", str(DATA / "container-nspawn.json"), "--manifest",
                str(DATA / "container.yaml"), "-o", str(col))
    assert r.returncode == 0, r.stderr
    assert b"Startup finished in" in r.stdout and b"default_target" in r.stdout
    out = tmp_path / "rep"
    r = run_cli("kpi", "report", str(col), "--manifest", str(DATA / "container.yaml"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kpi.html", "kpi.json", "kpi.junit.xml", "kpi.md"]
    r = run_cli("kpi", "compare", str(out / "kpi.json"), str(out / "kpi.json"))
    assert r.returncode == 0 and b"SAME" in r.stdout


def test_cli_bad_inputs_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something/9"}')
    r = run_cli("kpi", "report", str(bad), "--manifest", str(DATA / "container.yaml"))
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert r.stderr.decode().strip().count("\n") == 0 and "bad.json: schema:" in r.stderr.decode()
    r = run_cli("kpi", "collect", "--local", "--container", "1")
    assert r.returncode == 1 and b"exactly one target" in r.stderr
    r = run_cli("kpi", "collect", "--ssh", "nobody@127.0.0.1", "--port", "1", "--via", "busctl")
    assert r.returncode == 2 and b"cannot connect" in r.stderr and b"Traceback" not in r.stderr


def test_the_hooks_own_time_is_a_kpi_from_the_journal():
    """root_hook: bootimg-root.service started -> the verified root mounted, both from the boot's
    journal; from D-Bus alone (the manager forgets initrd units) it is not measurable."""
    recs = boots()
    for i, r in enumerate(recs):
        clock = r.milestones["boot_finished"].clock
        r.milestones["root_hook_start"] = Value("ok", 2_000_000, clock, "journal:unit-starting bootimg-root.service")
        r.milestones["root_mounted"] = Value("ok", 2_000_000 + (250 + 10 * i) * 1000, clock,
                                             "journal:job-done bootimg-root.service __MONOTONIC_TIMESTAMP")
    r = one(budget(measure="root_hook", statistic="max", warn_ms=265, fail_ms=300), recs)
    assert r.verdict == "warn" and r.stats["max"] == 270.0 and [s.value_ms for s in r.samples] == [250.0, 260.0, 270.0]
    assert one(budget(measure="root_hook", statistic="max", warn_ms=100, fail_ms=200), recs).verdict == "fail"
    live = boots()          # collected over D-Bus only: no start of the hook
    r = one(budget(measure="root_hook"), live)
    assert r.verdict == "not_measurable" and "journal" in r.message
