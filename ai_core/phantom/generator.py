"""Synthetic CT phantom cases: image, organ labels, findings and report, deterministic from a seed.

    case = generate_case(7, spacing=TRAINING_SPACING)          # fast, for training
    case = generate_case(7, spacing=BENCHMARK_SPACING)         # 512 x 512 slices
    case = generate_case(S, balanced_index=i)                  # case i of balanced set S
    write_case(case, out_dir, slice_order="shuffled")          # series/, labels.nii.gz, truth.json
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom.uid
import SimpleITK as sitk

from ai_core.phantom.anatomy import FOV_CENTER, FOV_MM, Grid, Slab, render_slab, sample_anatomy
from ai_core.phantom.findings import (
    FINDINGS,
    ORGAN_LABELS,
    PHANTOM_ORGANS,
    SUPPORTED_PAIRS,
    Finding,
    balanced_pairs,
    check_pairs,
    random_pairs,
)
from ai_core.phantom.placement import PAINTERS, place_findings
from ai_core.phantom.reports import Sentence, build_report
from ai_core.phantom.series import ORIENTATIONS, write_series
from ai_core.phantom.shapes import SmoothNoise

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
TRUTH_FORMAT = "ct-vlp-phantom-truth/1"
# Grids: training (128 x 128 x ~93 voxels, about 0.2 s), default, benchmark (512 x 512 x 280).
TRAINING_SPACING = (3.0, 3.0, 4.5)
DEFAULT_SPACING = (1.5, 1.5, 3.0)
BENCHMARK_SPACING = (0.75, 0.75, 1.5)
PATIENT_POSITIONS = {"HFS": "HFS", "FFS": "FFS", "HFP": "HFP", "FFP": "FFP"}
_SLAB_VOXELS = 2_500_000


@dataclass
class PhantomCase:
    """One generated case; ``image`` (int16 HU) and ``labels`` (uint8) share their geometry."""

    seed: int
    image: sitk.Image
    labels: sitk.Image
    organ_labels: dict[str, int]
    findings: list[Finding]  # the present findings, with their ground truth
    report: str
    sentences: list[Sentence]
    orientation: str = "HFS"
    patient_position: str = "HFS"
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    organ_volumes_ml: dict[str, float] = field(default_factory=dict)
    hidden_findings: list[Finding] = field(default_factory=list)  # placed but outside the image
    seconds: float = 0.0

    @property
    def organs_in_fov(self) -> list[str]:
        """Organs with at least one voxel in the image."""
        return [o for o in self.organ_labels if self.organ_volumes_ml.get(o, 0.0) > 0]

    @property
    def organ_sentences(self) -> dict[str, list[str]]:
        """Report sentences per organ (every organ in the field of view has at least one)."""
        out: dict[str, list[str]] = {o: [] for o in self.organ_labels}
        for s in self.sentences:
            out.setdefault(s.organ, []).append(s.text)
        return out

    def truth(self) -> dict[str, dict[str, bool]]:
        """Present/absent for every supported (organ, finding) pair."""
        present = {(f.organ, f.finding) for f in self.findings}
        return {o: {f: (o, f) in present for f in FINDINGS[o]} for o in self.organ_labels}

    def finding(self, organ: str, finding: str) -> Finding | None:
        """The present finding of that pair, if any."""
        return next((f for f in self.findings if f.organ == organ and f.finding == finding), None)


def case_seed(seed: int, balanced_index: int | None) -> int:
    """The anatomy seed of case ``balanced_index`` of the balanced set ``seed`` (or ``seed`` itself)."""
    if balanced_index is None:
        return int(seed)
    return zlib.crc32(f"balanced:{seed}:{balanced_index}".encode()) & 0x7FFFFFFF


def generate_case(
    seed: int,
    *,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    size: tuple[int, int, int] | None = None,
    orientation: str = "HFS",
    findings: list[tuple[str, str]] | None = None,
    balanced_index: int | None = None,
) -> PhantomCase:
    """Generate one phantom case, deterministic from its arguments.

    ``size`` (voxels along the grid's i, j, k axes) defaults to covering a 384 x 384 x 420 mm
    chest-abdomen field of view at ``spacing``. ``orientation``: HFS, FFS, HFP, FFP (axial;
    prone positions move dependent fluid anteriorly), sagittal, coronal or oblique. ``findings``
    fixes the (organ, finding) pairs; otherwise ``balanced_index`` selects case i of the balanced
    set ``seed`` (see findings.balanced_pairs), else findings are drawn at random.
    """
    t0 = time.perf_counter()
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; use one of {', '.join(ORIENTATIONS)}")
    if len(tuple(spacing)) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    cseed = case_seed(seed, balanced_index)
    if findings is not None:
        pairs = check_pairs(list(findings))
    elif balanced_index is not None:
        pairs = balanced_pairs(seed, balanced_index)
    else:
        pairs = random_pairs(np.random.default_rng([cseed, 0]))
    position = PATIENT_POSITIONS.get(orientation, "HFS")
    an = sample_anatomy(cseed, pairs, prone=position in ("HFP", "FFP"))
    # the patient is not always centred in the field of view
    shift = np.random.default_rng([cseed, 6]).uniform(-1.0, 1.0, 3) * np.array([10.0, 10.0, 15.0])
    grid = Grid.covering(spacing, size, ORIENTATIONS[orientation], center=FOV_CENTER + shift)

    rng = np.random.default_rng([cseed, 3])
    lo, hi = -FOV_MM / 2 - 80.0, FOV_MM / 2 + 80.0
    ctx: dict = {
        "bowel": SmoothNoise(rng, lo, hi, 13.0),
        "vessels1": SmoothNoise(rng, lo, hi, 16.0),
        "vessels2": SmoothNoise(rng, lo, hi, 16.0),
        "emphysema": SmoothNoise(rng, lo, hi, 14.0),
        "painters": PAINTERS,
        "liver_hu": an.hu["liver"],
    }
    placed = place_findings(an, pairs, cseed, accept=lambda o, c, r: _mostly_in(an, ctx, o, c, r))
    steat = next((f for f in placed if f.finding == "steatosis"), None)
    if steat is not None:
        ctx["liver_hu"] = steat.hu
    if ("esophagus", "enlargement") in pairs:
        ctx["esophagus_dilated"] = True

    nx, ny, nz = grid.size
    hu = np.empty((nz, ny, nx), dtype=np.int16)
    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    step = max(1, _SLAB_VOXELS // (nx * ny))
    noise_rng = np.random.default_rng([cseed, 4])
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        slab = Slab(grid, an, k0, k1)
        render_slab(slab, placed, ctx)
        v = slab.hu
        v += noise_rng.standard_normal(v.shape, dtype=np.float32) * np.float32(an.noise_sigma)
        np.clip(v, -1024, 3071, out=v)
        hu[k0:k1] = np.rint(v).astype(np.int16)
        labels[k0:k1] = slab.labels

    image = _to_sitk(hu, grid)
    label_img = _to_sitk(labels, grid)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(ORGAN_LABELS.values()) + 1)
    volumes = {o: round(float(counts[v]) * voxel_ml, 2) for o, v in ORGAN_LABELS.items()}

    for f in placed:  # anatomy coordinates -> physical LPS
        if f.center_lps is not None:
            f.center_lps = tuple(round(float(v), 2) for v in an.deformation.invert_point(np.array(f.center_lps)))
        if "foci" in f.details:
            f.details["foci"] = [
                [*(round(float(v), 2) for v in an.deformation.invert_point(np.array(p[:3]))), p[3]]
                for p in f.details["foci"]
            ]
        f.details.pop("lumps", None)
        f.details.pop("rot", None)
    # What the image does not show is not in the truth: organs outside the field of view are not
    # reported, and a finding that changed no voxel (e.g. cut off by a small --size) is kept apart.
    visible = [f for f in placed if f.voxels > 0]
    hidden = [f for f in placed if f.voxels == 0]
    in_fov = tuple(o for o in PHANTOM_ORGANS if volumes[o] > 0)
    report, sentences = build_report(visible, cseed, organs=in_fov)
    uid = lambda kind: pydicom.uid.generate_uid(entropy_srcs=["phantom", kind, str(cseed), str(seed)])  # noqa: E731
    case = PhantomCase(
        seed=int(seed),
        image=image,
        labels=label_img,
        organ_labels=dict(ORGAN_LABELS),
        findings=visible,
        report=report,
        sentences=sentences,
        orientation=orientation,
        patient_position=position,
        study_uid=uid("study"),
        series_uid=uid(f"series:{orientation}:{tuple(grid.spacing)}:{grid.size}"),
        frame_of_reference_uid=uid("for"),
        organ_volumes_ml=volumes,
        hidden_findings=hidden,
        seconds=time.perf_counter() - t0,
    )
    log.debug("phantom %d (%s, %s voxels) in %.2f s", seed, orientation, grid.size, case.seconds)
    return case


def _mostly_in(an, ctx: dict, organ: str, center: np.ndarray, radius: float) -> bool:
    """Whether most of a small probe grid around an anatomy point is labelled ``organ``."""
    p = an.deformation.invert_point(center)
    step = max(radius * 0.5, 1.0)
    probe = Grid.covering((step, step, step), (3, 3, 3), None, center=p)
    slab = Slab(probe, an, 0, 3)
    render_slab(slab, [], ctx)
    return float((slab.labels == ORGAN_LABELS[organ]).mean()) >= 0.75


def generate_balanced(n: int, seed: int, **kwargs) -> list[PhantomCase]:
    """The first ``n`` cases of the balanced set ``seed`` (each finding present in some, absent in others)."""
    return [generate_case(seed, balanced_index=i, **kwargs) for i in range(n)]


def _to_sitk(array: np.ndarray, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(v) for v in grid.spacing))
    img.SetOrigin(tuple(float(v) for v in grid.origin))
    img.SetDirection(tuple(float(v) for v in grid.direction.ravel()))
    return img


def truth_dict(case: PhantomCase) -> dict:
    """The ground truth of a case as written to truth.json (without file paths)."""
    present = {(f.organ, f.finding): f for f in case.findings}
    findings: dict[str, dict[str, dict]] = {}
    for organ in case.organ_labels:
        findings[organ] = {}
        for finding in FINDINGS[organ]:
            f = present.get((organ, finding))
            entry: dict = {"present": f is not None}
            if any(h.organ == organ and h.finding == finding for h in case.hidden_findings):
                entry["not_visible"] = True  # placed, but outside the field of view
            if f is not None:
                entry.update({k: v for k, v in f.to_dict().items() if k not in ("organ", "finding", "present")})
            findings[organ][finding] = entry
    img = case.image
    return {
        "format": TRUTH_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "seed": case.seed,
        "orientation": case.orientation,
        "patient_position": case.patient_position,
        "spacing": list(img.GetSpacing()),
        "size": list(img.GetSize()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
        "study_instance_uid": case.study_uid,
        "series_instance_uid": case.series_uid,
        "frame_of_reference_uid": case.frame_of_reference_uid,
        "organs": {
            o: {"label": v, "volume_ml": case.organ_volumes_ml.get(o, 0.0), "in_fov": case.organ_volumes_ml.get(o, 0) > 0}
            for o, v in case.organ_labels.items()
        },
        "findings": findings,
        "supported_pairs": [list(p) for p in SUPPORTED_PAIRS],
        "report": case.report,
        "organ_sentences": case.organ_sentences,
        "sentences": [{"organ": s.organ, "text": s.text, "findings": s.findings} for s in case.sentences],
    }


def write_case(
    case: PhantomCase,
    out_dir: Path,
    *,
    slice_order: str = "ascending",
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
    slice_thickness: float | None = None,
    series_subdir: str = "series",
    patient_id: str | None = None,
) -> Path:
    """Write ``series/`` (DICOM), ``labels.nii.gz``, ``report.txt`` and ``truth.json`` into ``out_dir``.

    Returns the path of truth.json; its ``series_dir`` and ``label_map`` are relative to it.
    """
    out_dir = Path(out_dir)
    series_dir = out_dir / series_subdir
    series_dir.mkdir(parents=True, exist_ok=True)
    files = write_series(
        case.image,
        series_dir,
        study_uid=case.study_uid,
        series_uid=case.series_uid,
        frame_of_reference_uid=case.frame_of_reference_uid,
        patient_id=patient_id or f"PHANTOM-{case.seed:06d}"[:64],
        patient_name=f"Phantom^{case.seed}",
        study_description="Synthetic CT phantom chest-abdomen",
        series_description=f"CT phantom {case.orientation}",
        slice_order=slice_order,  # type: ignore[arg-type]
        transfer_syntax=transfer_syntax,
        slice_thickness=slice_thickness,
        seed=case.seed,
        patient_position=case.patient_position,
    )
    sitk.WriteImage(case.labels, str(out_dir / "labels.nii.gz"), useCompression=True)
    truth = truth_dict(case)
    truth.update({
        "series_dir": series_subdir,
        "files": len(files),
        "label_map": "labels.nii.gz",
        "slice_order": slice_order,
        "transfer_syntax": str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID),
    })
    (out_dir / "report.txt").write_text(case.report)
    path = out_dir / "truth.json"
    path.write_text(json.dumps(truth, indent=2))
    return path


__all__ = [
    "BENCHMARK_SPACING",
    "DEFAULT_SPACING",
    "PHANTOM_ORGANS",
    "PhantomCase",
    "TRAINING_SPACING",
    "case_seed",
    "generate_balanced",
    "generate_case",
    "truth_dict",
    "write_case",
]
