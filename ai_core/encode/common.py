"""What the SEG, SR and SC encoders share: device identity, source headers, organ geometry, codes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from scipy import ndimage

from ai_core import __version__
from ai_core.catalogue import FINDINGS, ORGANS, FindingCode, Organ
from ai_core.result import AnalysisResult, ModelInfo

logger = logging.getLogger(__name__)

MANUFACTURER = "ct-vlp-dicom-node"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

# Series numbers of the result series, offset from the source series so they sort beside it.
SERIES_NUMBER_OFFSET = {"seg": 1000, "sr": 2000, "sc": 3000}

@dataclass(frozen=True)
class Device:
    """The node as the creator of result objects (SEG/SR/SC equipment and SR observer)."""

    name: str = "ct-vlp-dicom-node"
    serial_number: str = "0"

    @property
    def uid(self) -> str:
        """A stable Device Observer UID derived from the device name."""
        return pydicom.uid.generate_uid(entropy_srcs=["ct-vlp-dicom-node device", self.name])


def is_demo(result: AnalysisResult) -> bool:
    """True when a demo model produced any part of the result: every output says so."""
    return bool(result.model.demo or result.segmenter.demo)


def series_description(kind: str, result: AnalysisResult) -> str:
    """Series Description (max 64 chars) that says it is an AI result, and not for clinical use if demo."""
    base = {"seg": "AI organ segmentation", "sr": "AI findings report", "sc": "AI findings summary"}[kind]
    if result.refused:
        base = f"{base} - series not analysed"
    text = f"{base} - {NOT_FOR_CLINICAL_USE} (demo)" if is_demo(result) else base
    return text[:64]


def series_number(kind: str, source: Dataset) -> int:
    """Series number of a result series: the source's plus a fixed offset per kind."""
    base = int(getattr(source, "SeriesNumber", 0) or 0)
    return base + SERIES_NUMBER_OFFSET[kind]


def software_versions(result: AnalysisResult) -> list[str]:
    """Software Versions: the node and every model that contributed (a list: pydicom rejects tuples)."""
    return [f"{MANUFACTURER} {__version__}", result.segmenter.label[:64], result.model.label[:64]]


def result_instance(kind: str, result: AnalysisResult, sources: Sequence[Dataset], device: Device,
                    model: ModelInfo, series_instance_uid: str | None, sop_instance_uid: str | None) -> dict:
    """The arguments every highdicom constructor of a result object takes alike: its series and
    instance, and the equipment that made it (``model``: the one named as the model name)."""
    return {
        "series_instance_uid": series_instance_uid or hd.UID(),
        "series_number": series_number(kind, sources[0]),
        "sop_instance_uid": sop_instance_uid or hd.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": model.label[:64],
        "software_versions": software_versions(result),
        "device_serial_number": device.serial_number,
        "series_description": series_description(kind, result),
    }


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """SEG algorithm identification of a model (family: Artificial Intelligence, CID 7162)."""
    params = {"spec_hash": model.spec_hash} if model.spec_hash else None
    return hd.AlgorithmIdentificationSequence(
        name=model.name[:64], version=model.version[:64], family=codes.cid7162.ArtificialIntelligence,
        parameters=params,
    )


def organ_entry(key: str) -> Organ:
    """Catalogue entry of an organ key; a result naming an unknown organ cannot be encoded."""
    try:
        return ORGANS[key]
    except KeyError:
        raise ValueError(f"result names organ {key!r}, which the catalogue does not know "
                         f"(known: {', '.join(ORGANS)})") from None


def finding_entry(key: str) -> FindingCode:
    """Catalogue entry of a finding key."""
    try:
        return FINDINGS[key]
    except KeyError:
        raise ValueError(f"result names finding {key!r}, which the catalogue does not know "
                         f"(known: {', '.join(FINDINGS)})") from None


def laterality_word(organ: Organ) -> str:
    """'left', 'right' or '' for an organ."""
    if organ.laterality is None:
        return ""
    return "left" if organ.laterality.value == "7771000" else "right"


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """Source image headers without pixel data (the encoders never need the source pixels here)."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def check_sources(result: AnalysisResult, sources: Sequence[Dataset]) -> None:
    """Refuse sources that do not match the result (wrong series, wrong count, no geometry).

    A refused series (``result.refused``) has no masks; its report and summary say why it was not
    analysed, which needs its images to be one series with an orientation and positions.
    """
    if not sources:
        raise ValueError("the result lists no source files; the encoders need the analysed images")
    if len({str(p) for p in result.source_files}) != len(result.source_files) or any(
            int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in sources[:1]):
        raise ValueError("the source is a multi-frame image (e.g. Enhanced CT); the result encoders "
                         "support single-frame series only (one file per slice)")
    if result.labels is not None and result.labels.shape[0] != len(sources):
        raise ValueError(f"labels have {result.labels.shape[0]} slices but there are {len(sources)} "
                         "source images; labels[i] must be the label map of source_files[i]")
    if sources[0].StudyInstanceUID != result.study_instance_uid:
        raise ValueError(f"the source images belong to study {sources[0].StudyInstanceUID}, not the "
                         f"result's study {result.study_instance_uid}")
    for ds in sources:
        if ds.SeriesInstanceUID != result.series_instance_uid:
            raise ValueError(f"source image {ds.SOPInstanceUID} belongs to series {ds.SeriesInstanceUID}, "
                             f"not the analysed series {result.series_instance_uid}")
    if result.refused:
        missing = sorted({k for ds in sources for k in ("ImageOrientationPatient", "ImagePositionPatient",
                                                         "PixelSpacing", "FrameOfReferenceUID") if k not in ds})
        if missing:
            raise ValueError(f"the series was refused ({result.refused}) and its images lack "
                             f"{', '.join(missing)}: no report can point into them")
    if result.labels is not None:
        rows, cols = result.labels.shape[1:]
        ds = sources[0]
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"labels are {rows}x{cols} per slice but the images are {ds.Rows}x{ds.Columns}")


@dataclass(frozen=True)
class OrganGeometry:
    """Where an organ lies in the label array: its centroid slice and a pixel inside it there."""

    label: int
    slice_index: int  # the slice through the organ's centroid (one that contains the organ)
    row: int
    col: int
    bbox: tuple[slice, slice, slice]  # bounding box in (slice, row, column)
    voxels: int = 0
    # Slices through the organ, nearest the centroid first, large cross-sections only (>= 30 % of
    # the largest): where further findings of the organ are pointed at, one slice each.
    slices: tuple[int, ...] = ()


class LabelIndex:
    """One pass over a label map: which labels occur, on which slices, and where each organ lies.

    Bounding boxes come from a 2x in-plane subsampled view (4x less work on 512x512 slices);
    a label that the subsampled view misses is looked up at full resolution, so nothing is lost.
    """

    STRIDE = 2

    def __init__(self, labels: np.ndarray):
        if labels.ndim != 3 or labels.dtype != np.uint8:
            raise ValueError(f"labels must be a (slices, rows, columns) uint8 array, got {labels.dtype} "
                             f"{labels.shape}")
        self.labels = labels
        self.slice_max = labels.reshape(labels.shape[0], -1).max(axis=1)
        coarse = labels[:, :: self.STRIDE, :: self.STRIDE]
        self._boxes = ndimage.find_objects(coarse)

    def has(self, label: int) -> bool:
        """Does any voxel carry this label?"""
        return self.box(label) is not None

    def box(self, label: int) -> tuple[slice, slice, slice] | None:
        """Full-resolution bounding box of a label, or None when it has no voxels."""
        if not 0 < label < 256:
            return None
        b = self._boxes[label - 1] if label <= len(self._boxes) else None
        s = self.STRIDE
        rows, cols = self.labels.shape[1:]
        if b is not None:
            return (b[0], slice(max(b[1].start * s - s, 0), min(b[1].stop * s + s, rows)),
                    slice(max(b[2].start * s - s, 0), min(b[2].stop * s + s, cols)))
        # Thin structures can fall between the subsampled pixels: check at full resolution.
        candidates = np.flatnonzero(self.slice_max >= label)
        for k in candidates:
            if np.any(self.labels[k] == label):
                zs = [int(z) for z in candidates if np.any(self.labels[z] == label)]
                return (slice(min(zs), max(zs) + 1), slice(0, rows), slice(0, cols))
        return None

    def geometry(self, label: int) -> OrganGeometry | None:
        """Centroid slice and an in-organ pixel of a label, or None when it has no voxels."""
        box = self.box(label)
        if box is None:
            return None
        mask = self.labels[box] == label
        per_slice = mask.sum(axis=(1, 2))
        voxels = int(per_slice.sum())
        if voxels == 0:
            return None
        z = int(np.clip(round(float((per_slice * np.arange(len(per_slice))).sum() / voxels)),
                        0, len(per_slice) - 1))
        occupied = np.flatnonzero(per_slice)
        if per_slice[z] == 0:  # the centroid falls in a gap of a split organ: nearest occupied slice
            z = int(occupied[np.argmin(np.abs(occupied - z))])
        large = occupied[per_slice[occupied] >= 0.3 * per_slice.max()]
        order = large[np.argsort(np.abs(large - z), kind="stable")]
        row, col = self._inner_pixel(mask[z])
        return OrganGeometry(label, box[0].start + z, box[1].start + row, box[2].start + col, box, voxels,
                             tuple(int(box[0].start + k) for k in order))

    def point_on_slice(self, label: int, k: int) -> tuple[int, int] | None:
        """(row, column) of a pixel of the label on slice k near its cross-section's centre."""
        mask = self.labels[k] == label
        if not mask.any():
            return None
        return self._inner_pixel(mask)

    @staticmethod
    def _inner_pixel(mask2d: np.ndarray) -> tuple[int, int]:
        # The mask pixel nearest the cross-section's centroid: inside concave organs too.
        rr, cc = np.nonzero(mask2d)
        i = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
        return int(rr[i]), int(cc[i])


class SliceLocator:
    """Maps patient coordinates (LPS, mm) to (slice, row, column) of the sorted source images."""

    def __init__(self, sources: Sequence[Dataset]):
        iop = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
        self.row_dir, self.col_dir = iop[:3], iop[3:]
        self.normal = np.cross(self.row_dir, self.col_dir)
        self.positions = np.asarray([ds.ImagePositionPatient for ds in sources], dtype=float)
        self.spacing = np.asarray(sources[0].PixelSpacing, dtype=float)  # (row spacing, column spacing)
        self.offsets = self.positions @ self.normal
        self.rows, self.cols = int(sources[0].Rows), int(sources[0].Columns)

    def locate(self, point_lps: Sequence[float]) -> tuple[int, float, float] | None:
        """(slice index, row, column) nearest to a point, or None when it is outside the images."""
        p = np.asarray(point_lps, dtype=float)
        k = int(np.argmin(np.abs(self.offsets - p @ self.normal)))
        if len(self.offsets) > 1:
            gap = float(np.median(np.abs(np.diff(np.sort(self.offsets)))))
            if abs(self.offsets[k] - p @ self.normal) > max(gap, 1e-3):
                return None
        d = p - self.positions[k]
        col = float(d @ self.row_dir) / self.spacing[1]
        row = float(d @ self.col_dir) / self.spacing[0]
        if not (-0.5 <= row <= self.rows - 0.5 and -0.5 <= col <= self.cols - 0.5):
            return None
        return k, row, col

    def to_lps(self, k: int, row: float, col: float) -> np.ndarray:
        """Patient coordinates of pixel (row, col) on slice k (pixel centres at integers)."""
        return (self.positions[k] + col * self.spacing[1] * self.row_dir
                + row * self.spacing[0] * self.col_dir)


def code_of(code: Code) -> hd.sr.CodedConcept:
    """A fresh CodedConcept for a pydicom Code (fresh: highdicom may keep and extend it)."""
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
