"""Read one CT series into an oriented SimpleITK volume in Hounsfield units, or refuse it with a reason.

The volume keeps the acquisition grid: voxel (x, y, z) of the image is column x, row y of
``files[z]`` (slices sorted by position along the slice normal), so a label array indexed
(slice, row, column) in the sorted-source order is exactly ``GetArrayFromImage`` of a label image
on that grid. The image direction is (row direction, column direction, slice normal), which is
right-handed, whatever the patient position (HFS, FFS, prone...) or the stacking (axial, sagittal,
coronal).

Refusals raise ``VolumeRefused(reason)``; the pipeline copies the reason into
``AnalysisResult.refused``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ai_core.geometry import resample_nearest

logger = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Orientation cosines are written with limited precision: a difference below this is the same plane.
ORIENTATION_TOLERANCE = 1e-3


class VolumeRefused(Exception):
    """The series cannot be analysed safely; ``reason`` says why (it goes into the result)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class CTVolume:
    """A CT series as an oriented volume in HU; slice ``i`` of ``image`` comes from ``files[i]``."""

    image: sitk.Image  # int16 HU where the rescale allows it, else float32
    files: list[Path]  # one entry per slice, sorted along the slice normal
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str | None
    # Multi-frame (Enhanced CT): 1-based frame number of slice i in files[i]; None for single-frame.
    frame_numbers: list[int] | None = None
    # Header of files[i] without its pixel data (single-frame series read from files): the result
    # encoders reuse them instead of reading 300 files again. None when not kept.
    headers: list[pydicom.Dataset] | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns) of the volume, the order of label arrays."""
        x, y, z = self.image.GetSize()
        return (z, y, x)

    def array_view(self) -> np.ndarray:
        """A read-only (slices, rows, columns) view of the HU voxels; valid while ``image`` lives."""
        return sitk.GetArrayViewFromImage(self.image)


@dataclass
class _Slice:
    """One image plane as found in a file, before sorting."""

    path: Path
    frame: int | None  # 0-based frame index within a multi-frame file
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM writes it
    slope: float
    intercept: float
    rows: int
    columns: int


@dataclass
class _Source:
    """One read file: its identity and its planes."""

    path: Path
    dataset: pydicom.Dataset
    slices: list[_Slice]


def read_volume(
    paths: Path | str | Iterable[Path | str],
    *,
    min_slices: int = 10,
    spacing_tolerance: float = 0.05,
    max_tilt_degrees: float = 0.1,
) -> CTVolume:
    """Read one CT series (files or a folder) into a ``CTVolume``, or raise ``VolumeRefused``.

    ``spacing_tolerance`` is the largest relative deviation of a slice step from the median step.
    """
    files = _list_files(paths)
    sources = [s for s in (_read_source(p) for p in files) if s is not None]
    if not sources:
        raise VolumeRefused(f"no DICOM images found in {len(files)} file(s)")
    sources = _drop_duplicate_instances(sources)
    _check_series(sources)
    planes = [sl for src in sources for sl in src.slices]
    normal = _check_planes(planes)
    order, step = _sort_and_check_positions(planes, normal, min_slices, spacing_tolerance, max_tilt_degrees)
    planes = [planes[i] for i in order]
    ds0 = sources[0].dataset
    study_uid, series_uid = str(ds0.StudyInstanceUID), str(ds0.SeriesInstanceUID)
    for_uid = str(ds0.get("FrameOfReferenceUID", "")) or None
    del ds0
    multi = any(p.frame is not None for p in planes)
    by_path = {src.path: src for src in sources}
    headers = None if multi else [by_path[p.path].dataset for p in planes]
    hu = _decode_hu(planes, by_path)
    del sources, by_path
    first = planes[0]
    image = sitk.GetImageFromArray(hu)
    del hu
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    image.SetSpacing((first.pixel_spacing[1], first.pixel_spacing[0], step))
    image.SetOrigin(tuple(float(v) for v in first.position))
    # SimpleITK direction: row-major 3x3 whose columns are the x, y, z axes in LPS.
    image.SetDirection(tuple(float(v) for v in np.column_stack([row_dir, col_dir, normal]).ravel()))
    return CTVolume(
        image=image,
        files=[p.path for p in planes],
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
        frame_numbers=[p.frame + 1 for p in planes] if multi else None,
        headers=headers,
    )


def labels_to_image(labels: np.ndarray, volume: CTVolume) -> sitk.Image:
    """A uint8 label image on the volume's grid from a (slices, rows, columns) array in source order."""
    if tuple(labels.shape) != volume.shape:
        raise ValueError(f"label array shape {labels.shape} differs from the volume's (slices, rows, cols) {volume.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.CopyInformation(volume.image)
    return image


def image_to_labels(label_image: sitk.Image, volume: CTVolume) -> np.ndarray:
    """A (slices, rows, columns) uint8 array in source order from a label image on any grid.

    A label image on another grid is resampled onto the volume with nearest neighbour.
    """
    if not _same_grid(label_image, volume.image):
        label_image = resample_nearest(label_image, volume.image)
    if label_image.GetPixelID() != sitk.sitkUInt8:
        label_image = sitk.Cast(label_image, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(label_image)


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def _list_files(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise VolumeRefused(f"{p} does not exist")
    return files


def _read_source(path: Path) -> _Source | None:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        logger.debug("skipping %s: not a DICOM file", path)
        return None
    except Exception as exc:  # a truncated or corrupt file must not hide behind a generic crash
        raise VolumeRefused(f"cannot read {path.name}: {exc}") from exc
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if hasattr(ds, "file_meta") else ""
    if sop_class == DICOMDIR_SOP_CLASS or "PixelData" not in ds:
        logger.debug("skipping %s: no image pixel data", path)
        return None
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise VolumeRefused(f"{path.name} is modality {modality or 'unknown'}, not CT")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        raise VolumeRefused("the series is a localizer (scout) image, not a CT volume")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeRefused(f"{path.name} is not a greyscale image (Samples per Pixel {ds.SamplesPerPixel})")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        slices = _enhanced_slices(path, ds, n_frames)
    else:
        if n_frames > 1:
            raise VolumeRefused(f"{path.name} is multi-frame without per-frame geometry; cannot place its frames")
        slices = [_classic_slice(path, ds)]
    return _Source(path, ds, slices)


def _float_list(value, name: str, path: Path, n: int) -> np.ndarray:
    if value is None:
        raise VolumeRefused(f"{path.name} has no {name}; its slice cannot be placed in space")
    arr = np.asarray([float(v) for v in value], dtype=np.float64)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeRefused(f"{path.name} has an invalid {name} {list(value)}")
    return arr


def _classic_slice(path: Path, ds: pydicom.Dataset) -> _Slice:
    return _Slice(
        path=path,
        frame=None,
        position=_float_list(ds.get("ImagePositionPatient"), "Image Position (Patient)", path, 3),
        orientation=_float_list(ds.get("ImageOrientationPatient"), "Image Orientation (Patient)", path, 6),
        pixel_spacing=tuple(_float_list(ds.get("PixelSpacing"), "Pixel Spacing", path, 2)),
        slope=float(ds.get("RescaleSlope", 1) or 1),
        intercept=float(ds.get("RescaleIntercept", 0) or 0),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _group_item(frame_groups, shared, sequence: str):
    """The first item of a functional group sequence, per-frame first, then shared."""
    for groups in (frame_groups, shared):
        items = groups.get(sequence) if groups is not None else None
        if items:
            return items[0]
    return None


def _enhanced_slices(path: Path, ds: pydicom.Dataset, n_frames: int) -> list[_Slice]:
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n_frames:
        raise VolumeRefused(f"{path.name} announces {n_frames} frames but describes {len(per_frame)}")
    slices = []
    for i, groups in enumerate(per_frame):
        frame_type = _group_item(groups, shared, "CTImageFrameTypeSequence")
        if frame_type is not None and "LOCALIZER" in [str(v).upper() for v in frame_type.get("FrameType", [])]:
            raise VolumeRefused("the series contains localizer (scout) frames, not a CT volume")
        pos = _group_item(groups, shared, "PlanePositionSequence")
        ori = _group_item(groups, shared, "PlaneOrientationSequence")
        meas = _group_item(groups, shared, "PixelMeasuresSequence")
        pvt = _group_item(groups, shared, "PixelValueTransformationSequence")
        slices.append(
            _Slice(
                path=path,
                frame=i,
                position=_float_list(pos and pos.get("ImagePositionPatient"), f"frame {i + 1} position", path, 3),
                orientation=_float_list(
                    ori and ori.get("ImageOrientationPatient"), f"frame {i + 1} orientation", path, 6
                ),
                pixel_spacing=tuple(_float_list(meas and meas.get("PixelSpacing"), "Pixel Spacing", path, 2)),
                slope=float((pvt.get("RescaleSlope", 1) if pvt else ds.get("RescaleSlope", 1)) or 1),
                intercept=float((pvt.get("RescaleIntercept", 0) if pvt else ds.get("RescaleIntercept", 0)) or 0),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
            )
        )
    return slices


def _drop_duplicate_instances(sources: list[_Source]) -> list[_Source]:
    """The same instance received twice is one instance; distinct instances stay."""
    seen: dict[str, Path] = {}
    kept = []
    for src in sources:
        uid = str(src.dataset.get("SOPInstanceUID", "")) or str(src.path)
        if uid in seen:
            logger.warning("%s repeats SOP instance %s of %s; using one copy", src.path.name, uid, seen[uid].name)
            continue
        seen[uid] = src.path
        kept.append(src)
    return kept


def _check_series(sources: list[_Source]) -> None:
    def distinct(tag: str) -> set[str]:
        return {str(s.dataset.get(tag, "")) for s in sources}

    series = distinct("SeriesInstanceUID")
    if len(series) > 1:
        raise VolumeRefused(f"mixed series: the files belong to {len(series)} different series (Series Instance UID)")
    if "" in series:
        raise VolumeRefused("the images have no Series Instance UID")
    frames_of_ref = distinct("FrameOfReferenceUID")
    if len(frames_of_ref) > 1:
        raise VolumeRefused(f"mixed series: {len(frames_of_ref)} different frames of reference in one series")


def _check_planes(planes: list[_Slice]) -> np.ndarray:
    """Same size, spacing and orientation everywhere; returns the unit slice normal."""
    sizes = {(p.rows, p.columns) for p in planes}
    if len(sizes) > 1:
        raise VolumeRefused(f"mixed series: images of different sizes {sorted(sizes)}")
    spacings = np.array([p.pixel_spacing for p in planes])
    if np.ptp(spacings, axis=0).max() > 1e-3 * spacings.max():
        raise VolumeRefused("mixed series: images with different pixel spacings")
    if spacings.min() <= 0:
        raise VolumeRefused(f"invalid pixel spacing {spacings.min()} mm")
    orientations = np.array([p.orientation for p in planes])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise VolumeRefused("mixed series: images with different orientations (Image Orientation (Patient))")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        raise VolumeRefused(f"invalid Image Orientation (Patient) {orientations[0].tolist()}")
    normal = np.cross(row_dir, col_dir)
    return normal / np.linalg.norm(normal)


def _sort_and_check_positions(
    planes: list[_Slice], normal: np.ndarray, min_slices: int, tolerance: float, max_tilt_degrees: float
) -> tuple[list[int], float]:
    """Order along the normal and the slice step; refuses duplicates, gaps, irregular steps and tilt."""
    if len(planes) < min_slices:
        raise VolumeRefused(f"too few slices: {len(planes)} (at least {min_slices} are needed)")
    positions = np.array([p.position for p in planes])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-2)
    if dup.size:
        raise VolumeRefused(
            f"{dup.size} duplicate slice position(s), e.g. two images at {along[dup[0]]:.2f} mm along the normal"
        )
    step = float(np.median(steps))
    allowed = max(tolerance * step, 1e-2)
    bad = np.flatnonzero(np.abs(steps - step) > allowed)
    if bad.size:
        k = bad[0]
        if steps[k] > step and round(steps[k] / step) >= 2:
            raise VolumeRefused(
                f"missing slices: a gap of {steps[k]:.2f} mm between slices at {along[k]:.2f} and "
                f"{along[k + 1]:.2f} mm, where the spacing is {step:.2f} mm"
            )
        raise VolumeRefused(
            f"irregular slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm "
            f"(tolerance {allowed:.2f} mm around {step:.2f} mm)"
        )
    # Slices of a tilted gantry are stacked obliquely: their positions leave the slice normal.
    span = positions[order[-1]] - positions[order[0]]
    off_normal = np.linalg.norm(span - (span @ normal) * normal)
    tilt = math.degrees(math.atan2(off_normal, abs(span @ normal)))
    if tilt > max_tilt_degrees:
        raise VolumeRefused(
            f"gantry tilt: slices are stacked {tilt:.1f}° off their normal; resample the series to an "
            f"untilted grid before analysis"
        )
    return order.tolist(), step


def _decode_hu(planes: Sequence[_Slice], by_path: dict[Path, _Source]) -> np.ndarray:
    """Decode the pixels in sorted order into one (slices, rows, columns) HU array, int16 if exact."""
    rows, cols = planes[0].rows, planes[0].columns
    frames_cache: dict[Path, np.ndarray] = {}

    def raw(p: _Slice) -> np.ndarray:
        src = by_path[p.path]
        if p.frame is None:
            return _pixels(src)
        if p.path not in frames_cache:
            frames_cache[p.path] = _pixels(src).reshape(-1, rows, cols)
        return frames_cache[p.path][p.frame]

    integral = all(float(p.slope).is_integer() and float(p.intercept).is_integer() for p in planes)
    out: np.ndarray | None = None
    for k, p in enumerate(planes):
        pix = raw(p)
        if out is None:
            out = np.empty((len(planes), rows, cols), dtype=np.int16 if integral else np.float32)
        if out.dtype == np.int16:
            lo, hi = int(pix.min()) * p.slope + p.intercept, int(pix.max()) * p.slope + p.intercept
            if min(lo, hi) < -32768 or max(lo, hi) > 32767:
                # HU outside int16: keep exact values in float32 rather than wrapping around.
                out = out.astype(np.float32)
        if out.dtype == np.int16:
            if p.slope == 1:
                np.add(pix, np.int32(p.intercept), out=out[k], casting="unsafe")
            else:
                out[k] = pix.astype(np.int32) * int(p.slope) + int(p.intercept)
        else:
            np.multiply(pix, np.float32(p.slope), out=out[k], casting="unsafe")
            out[k] += np.float32(p.intercept)
        if p.frame is None:
            # Free the encoded pixel data (and pydicom's decoded copy) as we go; the header stays.
            del by_path[p.path].dataset.PixelData
            by_path[p.path].dataset = None
    assert out is not None
    return out


def _pixels(src: _Source) -> np.ndarray:
    try:
        return src.dataset.pixel_array
    except Exception as exc:
        ts = src.dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise VolumeRefused(
            f"cannot decode the pixel data of {src.path.name} (transfer syntax {ts}): {exc}; "
            "install pylibjpeg with its libjpeg/openjpeg/rle plugins or python-gdcm"
        ) from exc
