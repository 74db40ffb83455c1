"""Read the findings back out of one of our TID 1500 SRs (for the demo, tests and audits)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom import Dataset, dcmread

from ai_core.catalogue import FINDINGS, ORGANS
from ai_core.encode.sr import PRESENCE, PROBABILITY

_DECISION = {"present": "present", "absent": "absent", "presence undetermined": "not evaluated"}


@dataclass(frozen=True)
class SRFinding:
    """One (organ, finding) entry of the SR."""

    organ: str
    finding: str
    decision: str  # present | absent | not evaluated
    probability: float | None
    tracking_identifier: str
    tracking_uid: str


def _organ_key(site) -> str | None:
    lat = site.laterality
    for key, organ in ORGANS.items():
        if site.value == organ.code and ((lat is None and organ.laterality is None) or
                                         (lat is not None and organ.laterality is not None and lat == organ.laterality)):
            return key
    return None


def _finding_key(code) -> str | None:
    return next((k for k, f in FINDINGS.items() if f.code == code), None)


def read_sr_findings(sr: Dataset | str | Path) -> list[SRFinding]:
    """Every (organ, finding) group of a node SR, with decision and probability."""
    ds = sr if isinstance(sr, Dataset) else dcmread(sr)
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    groups = list(report.get_volumetric_roi_measurement_groups()) + list(report.get_image_measurement_groups())
    out = []
    for g in groups:
        if g.finding_type is None or not g.finding_sites:
            continue
        organ, finding = _organ_key(g.finding_sites[0]), _finding_key(g.finding_type)
        if organ is None or finding is None:
            continue
        presence = g.get_qualitative_evaluations(name=PRESENCE)
        decision = _DECISION.get(presence[0].value.meaning.lower(), "not evaluated") if presence else "not evaluated"
        probs = g.get_measurements(name=PROBABILITY)
        out.append(SRFinding(organ, finding, decision, float(probs[0].value) if probs else None,
                             str(g.tracking_identifier), str(g.tracking_uid)))
    return out
