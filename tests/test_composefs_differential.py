"""Differential test of the composefs core against the reference mkcomposefs/composefs-info
1.0.8, built from ../shared/composefs-1.0.8: a fixed seed, thousands of mutated dumps and
images (tests/cfsfuzz.py), and no disagreement allowed but the documented deliberate ones,
each confirmed by its own check of the input. Longer runs: bench/fuzz_composefs.py."""

from __future__ import annotations

import cfsfuzz

SEED = 20251206
N_DUMPS = 2000
N_IMAGES = 1000


def _show(report: cfsfuzz.Report) -> str:
    lines = [f"{report.counts} deliberate={report.rules} in {report.seconds:.0f} s"]
    for where, detail, case in report.disagreements[:20]:
        lines.append(f"{where} [{case.seed_name}; {', '.join(case.ops)}]: {detail}")
    return "\n".join(lines)


def test_dumps_agree_with_reference(reference):
    with cfsfuzz.fuzzer(reference, SEED) as fz:
        report = fz.run(N_DUMPS, 0)
    print(_show(report))
    assert not report.disagreements, _show(report)
    # Not a vacuous run: most cases are accepted by both with identical images, many are
    # refused by both.
    assert report.counts.get("same-output", 0) > N_DUMPS // 4, _show(report)
    assert report.counts.get("both-refuse", 0) > N_DUMPS // 10, _show(report)


def test_images_agree_with_reference(reference):
    with cfsfuzz.fuzzer(reference, SEED) as fz:
        report = fz.run(0, N_IMAGES)
    print(_show(report))
    assert not report.disagreements, _show(report)
    assert report.counts.get("same-output", 0) > N_IMAGES // 2, _show(report)
    assert report.counts.get("both-refuse", 0) + report.counts.get("no-answer", 0) > N_IMAGES // 10, _show(report)
