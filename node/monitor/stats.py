"""Structured output statistics of one job, made in the worker process from the plugin's result.

The node stores them (job_outputs, findings) so drift, shadow agreement and feedback can be computed
from the store; no patient data is in them, only the scanner, the model and the numbers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

SCANNER_TAGS = ("Manufacturer", "ManufacturerModelName", "StationName")


def scanner_of(sources: Mapping[str, Sequence[Any]]) -> str:
    """'Manufacturer / ManufacturerModelName / StationName' of the first series header that has any of them."""
    for headers in sources.values():
        for ds in headers[:1]:
            parts = [str(getattr(ds, tag, "") or "").strip() for tag in SCANNER_TAGS]
            if any(parts):
                return " / ".join(p or "?" for p in parts)
    return "unknown"


def model_key(plugin_name: str, plugin_version: str, model: Mapping[str, Any] | None) -> str:
    """The version that produced the output: the model package if the plugin has one, else the plugin."""
    if model:
        return f"{model['model']}:{model['model_version']}"
    return f"{plugin_name}:{plugin_version}"


def output_stats(result: Any, sources: Mapping[str, Sequence[Any]], plugin_name: str, plugin_version: str,
                 model: Mapping[str, Any] | None) -> dict:
    """Finding count, each finding's confidence and measurements, the scanner and the model version."""
    findings = []
    for f in result.findings:
        findings.append({
            "tracking_id": f.tracking_id,
            "finding_type": f.finding_type.meaning,
            "confidence": None if f.confidence is None else float(f.confidence),
            "measurements": [{"concept": m.concept.meaning, "value": float(m.value), "unit": m.unit.value}
                             for m in f.measurements],
        })
    return {"scanner": scanner_of(sources), "model": model_key(plugin_name, plugin_version, model),
            "finding_count": len(findings), "findings": findings}
