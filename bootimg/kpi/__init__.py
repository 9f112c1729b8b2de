"""The boot KPI verifier: measure boots on a target, judge them against the manifest's budgets, report.

Modules, one job each:

* ``model``     BootRecord / Value / UnitRecord: every number with a state and a source
* ``transport`` local bus, nspawn container, ssh, any D-Bus address; pystemd or busctl; recorded
* ``collect``   phases exactly as ``systemd-analyze time``, milestones, units
* ``history``   past boots from the journal (also a journal directory pulled off a board)
* ``stats``     n, min, median, mean, p90, p95, max, stdev
* ``judge``     budgets -> verdicts and exit codes; baseline comparison
* ``report``    the JSON report (source of truth) and its JUnit, HTML and Markdown renderings
* ``run``       boot N times (QEMU board, rig over ssh, nspawn container) and collect each boot
* ``commands``  ``bootimg kpi collect|run|report|compare``
"""
