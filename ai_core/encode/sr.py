"""The findings of an analysis as a Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

Every (organ, finding) of the result becomes one tracked finding (its own Tracking Unique
Identifier) made of two measurement groups that share that UID:

1. a **point group** (TID 1410) carrying the probability under a finding-specific concept: a
   2D SCOORD POINT on one source CT slice (the finding's location when the model gives one,
   else a pixel inside the organ, each finding of an organ on its own slice near the organ's
   centroid) when the finding has a probability; a SCOORD3D POINT at the organ's centre when
   it was not evaluated, and

2. a **volumetric group** (TID 1411) that references the organ's SEG segment through the source
   series, with the finding (121071), the finding site (363698007) with laterality, the
   probability, the organ volume, the presence (present/absent/undetermined) and the algorithm
   (TID 4019). An organ that has no segment gets a TID 1501 group with the same content instead.

Findings that were ``not evaluated`` keep both groups, with presence "Presence Undetermined",
no probability and the reason in the tracking identifier text; nothing is left out.

What viewers show (OHIF 3.13.2, read from its cornerstone-dicom-sr extension): groups are merged
by tracking UID; a merged finding without a SCOORD/SCOORD3D makes the SR viewport throw
(``coords[0].ReferencedSOPSequence`` of an empty list), which is why every finding has a point
group. For a 2D point OHIF draws an arrow on the referenced slice and labels it with up to five
lines: "<concept meaning of each NUM>: <value to 2 decimals> <unit code>" for every NUM of the
merged groups in document order, then "363698007: <finding site meaning>". It shows neither the
Finding code, the presence nor the tracking identifier. So the point group comes first and its
NUM's concept *names the finding*: a code of the node's private coding scheme 99CTVLP (declared
in the Coding Scheme Identification Sequence), meaning "Probability of <finding's SNOMED CT
meaning> (<side>)" (the measurement concept of TID 1410 is extensible, and private coding
schemes are allowed by PS3.3 8.2). The side is there because OHIF drops the finding site's
laterality. OHIF then reads e.g. "Probability of cyst (left): 0.93 1 / Probability: 0.93 1 /
Volume: 152.00 mL / 363698007: Kidney". The volumetric group keeps the standard concept
(DCM 122157) for every other consumer. dciodvfy warns that 99CTVLP is not a defined term (it
is private by construction); it reports no error.
Findings that were not evaluated, and organs without findings, get a SCOORD3D point instead
(the organ's centre, or the centre of the scanned volume when there is no mask): OHIF neither
crashes nor draws an arrow for them, so its arrows are exactly the findings with a probability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from ai_core.catalogue import FINDINGS, ORGANS
from ai_core.encode.common import (
    MANUFACTURER,
    Device,
    LabelIndex,
    OrganGeometry,
    SliceLocator,
    code_of,
    finding_entry,
    laterality_word,
    organ_entry,
    result_instance,
)
from ai_core.encode.highdicom_tuning import lean_sr_construction
from ai_core.encode.seg import SegmentInfo
from ai_core.result import AnalysisResult, FindingResult, ModelInfo, OrganResult

logger = logging.getLogger(__name__)

# Probability of a finding: (122157, DCM, "Probability"), from the DICOM code table (PS3.16
# Annex D; pydicom's codes.DCM.Probability). The specific concepts for probabilities are
# site-specific ("Probability of cancer", DCM 111047, CID 6048) or method-bound
# ("Bayesian-Probability", DCM 113270): the generic one fits a classifier's output. Unit: UCUM
# "1" ("no units", codes.UCUM.NoUnits), the UCUM unit of unity for dimensionless quantities,
# in CID 7181 "Abstract Multi-dimensional Image Model Component Units"; "{ratio}" (same CID)
# would claim a ratio of two measured quantities, which a probability is not.
PROBABILITY = codes.DCM.Probability
UNITY = codes.UCUM.NoUnits
MILLILITRE = Code("mL", "UCUM", "milliliter")
VOLUME = codes.SCT.Volume  # (118565006, SCT, "Volume")
# Presence as a qualitative evaluation: (121052, DCM, "Presence of property") valued (121053,
# DCM, "Present"), (121054, DCM, "Absent") or (121059, DCM, "Presence Undetermined") for
# findings that were not evaluated.
PRESENCE = codes.DCM.PresenceOfProperty
PRESENT = codes.DCM.Present
ABSENT = codes.DCM.Absent
UNDETERMINED = codes.DCM.PresenceUndetermined
PRESENCE_VALUE = {"present": PRESENT, "absent": ABSENT, "not evaluated": UNDETERMINED}

# The node's private coding scheme, for concepts DICOM has no code for (see module docstring).
PRIVATE_SCHEME = "99CTVLP"
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME, name="CT-VLP DICOM node local codes", version="1",
    responsible_organization="ct-vlp-dicom-node project",
)
_PRIVATE_VALUES = {
    "lesion": "P-LESION", "cyst": "P-CYST", "calcification": "P-CALC", "enlargement": "P-ENLARGE",
    "atrophy": "P-ATROPHY", "steatosis": "P-STEATOSIS", "emphysema": "P-EMPHYSEMA",
    "pleural_effusion": "P-PLEURAL-EFF",
}


def finding_probability_concept(finding: str, organ: str) -> Code:
    """The private concept 'Probability of <finding> (<side>)' that names the finding in OHIF's label.

    The finding is named by its SNOMED CT meaning (as in the group's Finding item); paired organs
    add the side, because OHIF shows the finding site's meaning ("Kidney") without its laterality.
    """
    meaning = finding_entry(finding).code.meaning
    value = _PRIVATE_VALUES.get(finding, ("P-" + finding.upper())[:14])
    side = laterality_word(organ_entry(organ))
    text = f"Probability of {meaning[:1].lower()}{meaning[1:]}"
    if side:
        return Code(f"{value}-{side[0].upper()}", PRIVATE_SCHEME, f"{text} ({side})")
    return Code(value, PRIVATE_SCHEME, text)


def tracking_text(f: FindingResult) -> str:
    """Human-readable tracking identifier, e.g. 'Liver - lesion - p=0.87 - present (AI)'.

    ASCII only: the SR keeps the source's character set, and dcmtk's dsrdump warns on UTF-8.
    """
    organ = organ_entry(f.organ)
    name = f.finding.replace("_", " ")
    if f.decision == "not evaluated":
        return f"{organ.display_name} - {name} - not evaluated: {f.reason or 'no reason given'} (AI)"
    p = f"p={f.probability:.2f}" if f.probability is not None else "p=n/a"
    return f"{organ.display_name} - {name} - {p} - {f.decision} (AI)"


def _alg(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of a model (name, version, family)."""
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=model.version[:64], family=codes.cid7162.ArtificialIntelligence)


def _finding_site(organ_key: str) -> hd.sr.FindingSite:
    organ = organ_entry(organ_key)
    return hd.sr.FindingSite(anatomic_location=code_of(organ.code),
                             laterality=code_of(organ.laterality) if organ.laterality else None)


@dataclass
class _Point:
    """Where a finding's point group points: a source slice pixel, or (no mask) a 3D position."""

    slice_index: int | None = None
    row: float = 0.0
    col: float = 0.0
    lps: np.ndarray | None = None


def _voxel_volume_ml(sources: Sequence[Dataset], locator: SliceLocator) -> float:
    gap = float(np.median(np.abs(np.diff(np.sort(locator.offsets))))) if len(sources) > 1 else float(
        getattr(sources[0], "SliceThickness", 1.0) or 1.0)
    return float(locator.spacing[0] * locator.spacing[1] * gap) / 1000.0


def build_sr(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    *,
    seg: Dataset | None,
    segments: Sequence[SegmentInfo] = (),
    index: LabelIndex | None = None,
    device: Device | None = None,
    predecessor: Dataset | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    lean: bool = True,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Comprehensive 3D SR with every (organ, finding) of the result.

    ``seg`` is the SEG built from the same result (its segments are referenced); ``predecessor``
    is an earlier SR of the same series that this one supersedes. ``lean``: construct it through
    ``highdicom_tuning`` (the same document, sooner).
    """
    device = device or Device()
    if not result.findings and not result.organs:
        raise ValueError("the result has neither organs nor findings; there is nothing to report")
    if segments and seg is None:
        raise ValueError("segments were given without the SEG that holds them")
    if result.labels is not None and index is None:
        index = LabelIndex(result.labels)
    locator = SliceLocator(sources)
    segment_of = {s.organ: s.segment_number for s in segments}
    geometry: dict[str, OrganGeometry] = {}
    for o in result.organs:
        if index is not None and o.label > 0:
            g = index.geometry(o.label)
            if g is not None:
                geometry[o.organ] = g
    voxel_ml = _voxel_volume_ml(sources, locator)

    findings = _ordered_findings(result)
    points = _assign_points(findings, geometry, index, locator)
    groups: list = []
    referenced: dict[str, Dataset] = {}
    for i, f in enumerate(findings):
        organ = result.organ(f.organ)
        groups.extend(_finding_groups(f, organ, points[i], result, sources, seg, segment_of.get(f.organ),
                                      _organ_volume(organ, geometry.get(f.organ), voxel_ml), referenced))
    # Segmented organs without any finding still report their volume.
    with_findings = {f.organ for f in findings}
    for o in result.organs:
        if o.organ in with_findings or o.organ not in segment_of:
            continue
        g = geometry[o.organ]
        groups.extend(_organ_only_groups(o, g, result, sources, seg, segment_of[o.organ],
                                         _organ_volume(o, g, voxel_ml), locator, referenced))
    if not groups:
        raise ValueError("no finding could be encoded")

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.uid, name=device.name[:64], manufacturer_name=MANUFACTURER,
            model_name=f"{result.model.label} + {result.segmenter.label}"[:64],
            serial_number=device.serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    evidence = list(referenced.values()) or [sources[len(sources) // 2]]
    if seg is not None:
        evidence.append(seg)
    with lean_sr_construction(lean):
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            **result_instance("sr", result, sources, device, result.model, series_instance_uid, sop_instance_uid),
            is_complete=True,
            is_final=True,
            is_verified=False,  # nobody has verified an AI result
            previous_versions=[predecessor] if predecessor is not None else None,
            coding_schemes=[PRIVATE_SCHEME_ITEM],
        )


def _ordered_findings(result: AnalysisResult) -> list[FindingResult]:
    """Findings in catalogue order (organ, then finding), every one kept; unknown keys fail."""
    organ_order = {k: i for i, k in enumerate(ORGANS)}
    finding_order = {k: i for i, k in enumerate(FINDINGS)}
    for f in result.findings:
        organ_entry(f.organ)
        finding_entry(f.finding)
        if f.decision not in PRESENCE_VALUE:
            raise ValueError(f"finding {f.organ}/{f.finding} has decision {f.decision!r}; "
                             "expected present, absent or not evaluated")
        if f.probability is not None and not 0.0 <= f.probability <= 1.0:
            raise ValueError(f"finding {f.organ}/{f.finding} has probability {f.probability}, "
                             "outside 0..1")
    return sorted(result.findings, key=lambda f: (organ_order[f.organ], finding_order[f.finding]))


def _organ_volume(organ: OrganResult | None, g: OrganGeometry | None, voxel_ml: float) -> float | None:
    """Organ volume in mL: the pipeline's value, else counted from the mask."""
    if organ is None:
        return None
    if organ.volume_ml is not None:
        return float(organ.volume_ml)
    return g.voxels * voxel_ml if g is not None else None


def _volume_centre(locator: SliceLocator) -> _Point:
    k = len(locator.offsets) // 2
    return _Point(lps=locator.to_lps(k, (locator.rows - 1) / 2, (locator.cols - 1) / 2))


def _assign_points(findings: Sequence[FindingResult], geometry: dict[str, OrganGeometry],
                   index: LabelIndex | None, locator: SliceLocator) -> list[_Point]:
    """Where each finding's point group points (one entry per finding, in order).

    Findings with a probability get a 2D point OHIF draws: the model's own point when it lies
    on the images, else a pixel inside the organ, each finding of an organ on its own slice
    (nearest the organ's centroid first; present findings first) so that their labels do not
    pile up. Findings without a probability (not evaluated) get a 3D point at the organ's
    centre, or at the centre of the scanned volume when there is no mask: OHIF draws nothing
    for them, and they carry nothing to read.
    """
    out: list[_Point | None] = [None] * len(findings)
    by_organ: dict[str, list[int]] = {}
    for i, f in enumerate(findings):
        by_organ.setdefault(f.organ, []).append(i)
    for organ_key, idxs in by_organ.items():
        g = geometry.get(organ_key)
        shown = [i for i in idxs if findings[i].decision != "not evaluated" and findings[i].probability is not None]
        shown.sort(key=lambda i: (findings[i].decision != "present", -(findings[i].probability or 0.0)))
        slot = 0
        for i in shown:
            f = findings[i]
            if f.point_lps is not None:
                hit = locator.locate(f.point_lps)
                if hit is not None:
                    out[i] = _Point(hit[0], hit[1], hit[2])
                    continue
                logger.warning("point of %s/%s lies outside the images; pointing at the organ",
                               f.organ, f.finding)
            if g is None or index is None:
                out[i] = _volume_centre(locator)
                continue
            k = g.slices[slot % len(g.slices)] if g.slices else g.slice_index
            slot += 1
            rc = index.point_on_slice(g.label, k) if k != g.slice_index else (g.row, g.col)
            out[i] = _Point(k, float(rc[0]), float(rc[1])) if rc else _Point(g.slice_index, float(g.row),
                                                                                float(g.col))
        for i in idxs:
            if out[i] is None:
                out[i] = (_Point(lps=locator.to_lps(g.slice_index, g.row, g.col)) if g is not None
                          else _volume_centre(locator))
    return out  # type: ignore[return-value]


def _region(point: _Point, sources: Sequence[Dataset], referenced: dict[str, Dataset]):
    if point.slice_index is None:
        return hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                   graphic_data=np.asarray([point.lps], dtype=float),
                                   frame_of_reference_uid=sources[0].FrameOfReferenceUID)
    ds = sources[point.slice_index]
    referenced[ds.SOPInstanceUID] = ds
    # SCOORD pixel coordinates: (column, row), the top-left corner of the first pixel is (0, 0).
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.asarray([[point.col + 0.5, point.row + 0.5]], dtype=float),
        source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID),
    )


def _finding_groups(f: FindingResult, organ: OrganResult | None, point: _Point, result: AnalysisResult,
                    sources: Sequence[Dataset], seg: Dataset | None, segment_number: int | None,
                    volume_ml: float | None, referenced: dict[str, Dataset]) -> list:
    """The point group and the volumetric (or TID 1501) group of one finding, sharing a tracking UID."""
    uid = hd.UID()
    text = tracking_text(f)
    finding_code = code_of(finding_entry(f.finding).code)
    has_p = f.probability is not None and f.decision != "not evaluated"
    point_measurements = []
    if has_p:
        point_measurements.append(hd.sr.Measurement(
            name=code_of(finding_probability_concept(f.finding, f.organ)), value=float(f.probability),
            unit=code_of(UNITY)))
    point_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=text),
        referenced_region=_region(point, sources, referenced),
        finding_type=finding_code,
        finding_sites=[_finding_site(f.organ)],
        measurements=point_measurements or None,
        # No TID 4019 here: the volumetric group with the same tracking UID names the algorithm.
    )
    measurements = []
    if has_p:
        measurements.append(hd.sr.Measurement(name=code_of(PROBABILITY), value=float(f.probability),
                                              unit=code_of(UNITY)))
    if volume_ml is not None and segment_number is not None:
        # Measured on the referenced segment, whose SEG names the segmentation algorithm.
        measurements.append(hd.sr.Measurement(name=code_of(VOLUME), value=round(volume_ml, 1),
                                              unit=code_of(MILLILITRE)))
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=text),
        finding_type=code_of(finding_entry(f.finding).code),
        finding_sites=[_finding_site(f.organ)],
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(code_of(PRESENCE),
                                                             code_of(PRESENCE_VALUE[f.decision]))],
        algorithm_id=_alg(result.model),
    )
    if segment_number is not None and seg is not None:
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segment_number,
                source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid),
            ),
            **common,
        )
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return [point_group, group]


def _organ_only_groups(o: OrganResult, g: OrganGeometry, result: AnalysisResult, sources: Sequence[Dataset],
                       seg: Dataset, segment_number: int, volume_ml: float | None, locator: SliceLocator,
                       referenced: dict[str, Dataset]) -> list:
    """A segmented organ without findings: its volume, with a 3D point (OHIF needs one, draws none)."""
    uid = hd.UID()
    organ = organ_entry(o.organ)
    text = f"{organ.display_name} - organ (AI)"
    vol = ([hd.sr.Measurement(name=code_of(VOLUME), value=round(volume_ml, 1), unit=code_of(MILLILITRE),
                              algorithm_id=_alg(result.segmenter))] if volume_ml is not None else None)
    point = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=text),
        referenced_region=_region(_Point(lps=locator.to_lps(g.slice_index, g.row, g.col)), sources, referenced),
        finding_sites=[_finding_site(o.organ)],
        algorithm_id=_alg(result.segmenter),
    )
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=text),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid)),
        finding_sites=[_finding_site(o.organ)],
        measurements=vol,
        algorithm_id=_alg(result.segmenter),
    )
    return [point, volumetric]
