"""The JSON report: versioned, raw per-boot samples, provenance, budgets, image digest.

``schema`` is ``bootimg.kpi.report/1``. Top level: what was measured (``manifest``: path,
sha256, identity; ``budgets`` exactly as declared; ``image``: the digests the boards said they
booted), how (``percentile_method``, each boot's ``source`` and every value's ``source``), the
``boots`` (full records, incl. the raw property sets), the ``kpis`` (verdict, statistic,
message, all statistics, every per-boot sample) and ``verdict``/``exit_code``.

A *collection* (``kpi collect -o``) is the same document without budgets and verdicts:
``schema`` ``bootimg.kpi.boots/1``, just ``boots``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ...errors import BootimgError
from ...manifest.model import KpiBudget, Manifest
from ..judge import KpiResult, exit_code, judge, overall
from ..model import BootRecord
from ..stats import PERCENTILE_METHOD

SCHEMA = "bootimg.kpi.report/1"
BOOTS_SCHEMA = "bootimg.kpi.boots/1"


def _tool() -> str:
    try:
        from importlib.metadata import version
        return f"bootimg {version('bootimg')}"
    except Exception:
        return "bootimg"


def budget_dict(b: KpiBudget) -> dict[str, Any]:
    return {k: v for k, v in {"name": b.name, "measure": b.measure, "unit": b.unit, "since": b.since,
                              "statistic": b.statistic, "warn_ms": b.warn_ms, "fail_ms": b.fail_ms,
                              "max_ms": b.max_ms}.items() if v is not None}


def budget_from_dict(d: dict[str, Any]) -> KpiBudget:
    return KpiBudget(name=d["name"], measure=d["measure"], since=d.get("since", "kernel_start"),
                     statistic=d["statistic"], warn_ms=d["warn_ms"], fail_ms=d["fail_ms"], unit=d.get("unit"),
                     max_ms=d.get("max_ms"))


def manifest_info(manifest: Manifest | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    info: dict[str, Any] = {"name": manifest.identity.name, "version": manifest.identity.version}
    if manifest.source_file is not None:
        info["path"] = str(manifest.source_file)
        try:
            info["sha256"] = hashlib.sha256(Path(manifest.source_file).read_bytes()).hexdigest()
        except OSError:
            pass
    return info


def build_report(boots: Sequence[BootRecord], manifest: Manifest | None,
                 budgets: Sequence[KpiBudget] | None = None, *, target: str | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge ``boots`` against ``budgets`` (default: all of the manifest's) into the JSON report."""
    if budgets is None:
        budgets = manifest.all_budgets() if manifest is not None else ()
    results = judge(boots, budgets, manifest)
    digests = sorted({b.image_digest for b in boots if b.image_digest})
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": _tool(),
        "manifest": manifest_info(manifest),
        "target": target or (boots[0].source if boots else None),
        "image": {"digest": digests[0] if len(digests) == 1 else None, "digests": digests,
                  "verity": sorted({str((b.booted or {}).get("verity")) for b in boots if b.booted})},
        "percentile_method": PERCENTILE_METHOD,
        "budgets": [budget_dict(b) for b in budgets],
        "verdict": overall(results),
        "exit_code": exit_code(results),
        "kpis": [r.to_dict() for r in results],
        "boots": [b.to_dict() for b in boots],
    }
    if extra:
        doc.update(extra)
    return doc


def report_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def _load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise BootimgError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    except ValueError as e:
        raise BootimgError(f"not JSON: {e}", file=str(path), where=getattr(e, "lineno", None)) from None
    if not isinstance(data, dict):
        raise BootimgError("not a KPI report or collection (top level is not an object)", file=str(path))
    return data


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A report written by ``kpi report``/``kpi run`` (schema checked)."""
    data = _load_json(path)
    if data.get("schema") != SCHEMA:
        raise BootimgError(f"schema: expected {SCHEMA!r}, found {data.get('schema')!r}", file=str(path))
    try:
        data["_results"] = [KpiResult.from_dict(k) for k in data["kpis"]]
    except (KeyError, TypeError) as e:
        raise BootimgError(f"kpis: malformed KPI result ({e})", file=str(path)) from None
    return data


def load_boots(path: str | os.PathLike[str]) -> list[BootRecord]:
    """The boot records of a collection or a report."""
    data = _load_json(path)
    if data.get("schema") not in (SCHEMA, BOOTS_SCHEMA):
        raise BootimgError(f"schema: expected {BOOTS_SCHEMA!r} or {SCHEMA!r}, found {data.get('schema')!r}",
                           file=str(path))
    out = []
    for i, b in enumerate(data.get("boots", [])):
        try:
            out.append(BootRecord.from_dict(b))
        except (KeyError, TypeError, AttributeError) as e:
            raise BootimgError(f"boots[{i}]: malformed boot record ({e})", file=str(path)) from None
    return out


def boots_document(boots: Sequence[BootRecord]) -> dict[str, Any]:
    return {"schema": BOOTS_SCHEMA, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tool": _tool(), "boots": [b.to_dict() for b in boots]}


def results_of(doc: dict[str, Any]) -> list[KpiResult]:
    if "_results" in doc:
        return doc["_results"]
    return [KpiResult.from_dict(k) for k in doc["kpis"]]
