"""Writing a SimpleITK CT volume as a DICOM CT Image Storage series with realistic headers.

Geometry comes only from the image (origin, spacing, direction): Image Position/Orientation
are derived per slice, so any direction (axial HFS/FFS/prone, sagittal, coronal, oblique) is
written correctly. Instance numbers and file names follow ``slice_order`` on purpose, so a
reader that sorts by file name or instance number instead of by position gets it wrong.
"""

from __future__ import annotations

import datetime as _dt
import logging
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import pydicom.uid
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.valuerep import DSfloat

log = logging.getLogger(__name__)

MANUFACTURER = "CT-VLP phantom"
MODEL_NAME = "Synthetic CT"
SOFTWARE_VERSION = "ct-vlp-phantom 1"

SliceOrder = Literal["ascending", "descending", "shuffled"]

# Transfer syntaxes the writer can produce, with a short name for command lines.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": pydicom.uid.ExplicitVRLittleEndian,
    "implicit": pydicom.uid.ImplicitVRLittleEndian,
    "rle": pydicom.uid.RLELossless,
    "jpegls": pydicom.uid.JPEGLSLossless,
    "jpeg2000": pydicom.uid.JPEG2000Lossless,
    "jpeg-lossless": pydicom.uid.JPEGLosslessSV1,
}

_UNCOMPRESSED = {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian}
# Conventional axial orientations of each patient position (row, column direction cosines).
_AXIAL_IOP = {
    "HFS": (1, 0, 0, 0, 1, 0),
    "FFS": (-1, 0, 0, 0, 1, 0),
    "HFP": (-1, 0, 0, 0, -1, 0),
    "FFP": (1, 0, 0, 0, -1, 0),
}


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# Direction matrices (columns: row direction, column direction, slice direction; right-handed)
# of the orientations the phantom tools offer.
ORIENTATIONS: dict[str, np.ndarray] = {
    "HFS": np.eye(3),
    "FFS": np.array([[-1, 0, 0], [0, 1, 0], [0, 0, -1]], dtype=float),
    "HFP": np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], dtype=float),
    "FFP": np.array([[1, 0, 0], [0, -1, 0], [0, 0, -1]], dtype=float),
    "sagittal": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),
    "oblique": _rotation(np.radians(20), np.radians(-12), np.radians(15)),
}


def orientation_direction(name: str) -> tuple[float, ...]:
    """The SimpleITK direction (row-major 3x3) of an orientation name from ORIENTATIONS."""
    if name not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {name!r}; use one of {', '.join(ORIENTATIONS)}")
    return tuple(float(v) for v in ORIENTATIONS[name].ravel())


def resolve_transfer_syntax(name: str) -> str:
    """A transfer syntax UID from a short name (see TRANSFER_SYNTAXES), a UID or a UID keyword."""
    if name in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[name]
    if name in TRANSFER_SYNTAXES.values():
        return name
    for uid in TRANSFER_SYNTAXES.values():
        if pydicom.uid.UID(uid).keyword == name:
            return uid
    raise ValueError(
        f"unsupported transfer syntax {name!r}; use one of {', '.join(TRANSFER_SYNTAXES)} "
        "or their UIDs"
    )


def _ds(x: float) -> DSfloat:
    # Round away float noise (6e-17 cosines) and keep every value within DS's 16 characters.
    v = float(np.round(x, 6)) + 0.0
    return DSfloat(v, auto_format=True)


def _uid(*parts: object) -> str:
    return pydicom.uid.generate_uid(entropy_srcs=[str(p) for p in parts])


def _infer_patient_position(iop: np.ndarray) -> str:
    for pos, ref in _AXIAL_IOP.items():
        if np.allclose(iop, ref, atol=1e-3):
            return pos
    return "HFS"


def _encode_jpeg_lossless_sv1(frame: np.ndarray, bits_stored: int) -> bytes:
    """JPEG Lossless SV1 of one uint16 frame through GDCM (pydicom 3 has no encoder for it)."""
    import gdcm  # python-gdcm, a declared dependency

    rows, cols = frame.shape
    writer = gdcm.ImageWriter()  # keeps the image alive
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetPhotometricInterpretation(
        gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2)
    )
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, 0))
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetByteStringValue(np.ascontiguousarray(frame, dtype="<u2").tobytes())
    image.SetDataElement(elem)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    if not change.Change():
        raise RuntimeError("GDCM could not encode the frame as JPEG Lossless SV1")
    seq = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    if seq is None or seq.GetNumberOfFragments() < 1:
        raise RuntimeError("GDCM returned no JPEG Lossless fragments")
    data = b"".join(
        seq.GetFragment(i).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")
        for i in range(seq.GetNumberOfFragments())
    )
    return data


def _geometry(volume: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Origin, spacing, direction (columns = i, j, k axes) and slice normal of a 3D image."""
    if volume.GetDimension() != 3:
        raise ValueError(f"write_series needs a 3D image, got {volume.GetDimension()}D")
    origin = np.asarray(volume.GetOrigin(), dtype=float)
    spacing = np.asarray(volume.GetSpacing(), dtype=float)
    d = np.asarray(volume.GetDirection(), dtype=float).reshape(3, 3)
    row, col, kdir = d[:, 0], d[:, 1], d[:, 2]
    normal = np.cross(row, col)
    if abs(float(row @ col)) > 1e-4 or abs(abs(float(normal @ kdir)) - 1.0) > 1e-4:
        raise ValueError(
            "the image direction is not orthonormal (sheared or tilted stack); DICOM slices "
            "need the slice axis perpendicular to the image plane: resample the volume first"
        )
    return origin, spacing, d, normal


def _storage_params(hu: np.ndarray) -> tuple[int, int]:
    """(rescale intercept, bits stored) for unsigned 16-bit storage of the HU range."""
    lo = int(hu.min()) if hu.size else 0
    hi = int(hu.max()) if hu.size else 0
    intercept = min(-1024, lo)
    top = hi - intercept
    if top >= 1 << 16:
        raise ValueError(
            f"HU range {lo}..{hi} does not fit 16 bits; clip the volume to e.g. -1024..3071"
        )
    bits = max(12, int(top).bit_length())
    return intercept, bits


def hash_int(text: str) -> int:
    """A stable (process-independent) integer hash of a string."""
    return zlib.crc32(text.encode())


def _offset_time(date: _dt.date, base_seconds: int, offset: int) -> str:
    t = _dt.datetime.combine(date, _dt.time()) + _dt.timedelta(seconds=base_seconds + offset)
    return t.strftime("%H%M%S")


def write_series(
    volume: sitk.Image,
    out_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "PHANTOM-0001",
    patient_name: str = "Phantom^Demo",
    study_description: str = "Synthetic CT phantom",
    series_number: int = 1,
    series_description: str = "CT phantom",
    slice_order: SliceOrder = "ascending",
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
    slice_thickness: float | None = None,
    file_prefix: str = "CT",
    seed: int = 0,
    patient_position: str | None = None,
    accession_number: str | None = None,
    study_date: _dt.date | None = None,
) -> list[Path]:
    """Write an int16 HU volume as one CT Image Storage file per slice; returns the paths.

    ``slice_order``: "ascending" numbers instances along the volume's slice index k,
    "descending" against it, "shuffled" at random (from ``seed``). Files are named by instance
    number. UIDs not given are derived deterministically from ``seed``. ``transfer_syntax`` is a
    UID or a short name from TRANSFER_SYNTAXES. ``patient_position`` defaults to the one implied
    by an axial orientation (HFS otherwise).
    """
    ts = pydicom.uid.UID(resolve_transfer_syntax(str(transfer_syntax)))
    if slice_order not in ("ascending", "descending", "shuffled"):
        raise ValueError(f"slice_order must be ascending, descending or shuffled, not {slice_order!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    origin, spacing, d, normal = _geometry(volume)
    hu = sitk.GetArrayViewFromImage(volume)  # (k, j, i) = (slice, row, column)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    n_slices, rows, cols = hu.shape
    intercept, bits_stored = _storage_params(hu)
    stored = (hu.astype(np.int32) - intercept).astype(np.uint16)

    study_uid = study_uid or _uid("study", seed, patient_id)
    series_uid = series_uid or _uid("series", seed, study_uid, series_number)
    frame_of_reference_uid = frame_of_reference_uid or _uid("for", seed, study_uid)
    iop = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    if patient_position is None:
        patient_position = _infer_patient_position(np.asarray(iop, dtype=float))
    thickness = float(slice_thickness) if slice_thickness is not None else float(spacing[2])
    axial = abs(float(normal[2])) > 0.99
    date = study_date or (_dt.date(2024, 1, 1) + _dt.timedelta(days=seed % 366))
    date_s = date.strftime("%Y%m%d")
    rng = np.random.default_rng(seed)
    base_seconds = 8 * 3600 + int(rng.integers(0, 9 * 3600))
    time_s = (_dt.datetime.combine(date, _dt.time()) + _dt.timedelta(seconds=base_seconds)).strftime(
        "%H%M%S"
    )
    accession = accession_number or f"A{hash_int(study_uid) % 10**9:09d}"

    if slice_order == "ascending":
        instance = np.arange(1, n_slices + 1)
    elif slice_order == "descending":
        instance = np.arange(n_slices, 0, -1)
    else:
        instance = rng.permutation(n_slices) + 1

    meta_template = FileMetaDataset()
    meta_template.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta_template.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian

    paths: list[Path] = []
    width = max(4, len(str(n_slices)))
    for k in range(n_slices):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if axial else ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = _uid("instance", series_uid, k)
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date_s
        ds.StudyTime = ds.SeriesTime = time_s
        ds.AcquisitionTime = ds.ContentTime = _offset_time(date, base_seconds, 60 + k // 10)
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.InstitutionName = "Synthetic Hospital"
        ds.ReferringPhysicianName = ""
        ds.StationName = "PHANTOM01"
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = MODEL_NAME
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientAge = "050Y"
        ds.BodyPartExamined = "CHEST"  # chest + abdomen field of view; CHEST is the closest term
        ds.SliceThickness = _ds(thickness)
        ds.KVP = "120"
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.DeviceSerialNumber = "0001"
        ds.SoftwareVersions = SOFTWARE_VERSION
        ds.ProtocolName = "Phantom chest-abdomen"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(max(cols * spacing[0], rows * spacing[1]))
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "200"
        ds.Exposure = "100"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(instance[k])
        ipp = origin + k * spacing[2] * d[:, 2]
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(ipp @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing, column spacing
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
        ds.RescaleIntercept = str(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"

        meta = FileMetaDataset(meta_template)
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta
        frame = stored[k]
        _set_pixels(ds, frame, ts, bits_stored)

        path = out_dir / f"{file_prefix}{int(instance[k]):0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.debug("wrote %d slices of series %s to %s (%s)", n_slices, series_uid, out_dir, ts.name)
    return paths


def _set_pixels(ds: Dataset, frame: np.ndarray, ts: pydicom.uid.UID, bits_stored: int) -> None:
    if ts in _UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = np.ascontiguousarray(frame, dtype="<u2").tobytes()
        return
    if ts == pydicom.uid.JPEGLosslessSV1:
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([_encode_jpeg_lossless_sv1(frame, bits_stored)])
        ds["PixelData"].VR = "OB"
        return
    plugin = "pylibjpeg" if ts == pydicom.uid.RLELossless else ""
    if ts == pydicom.uid.RLELossless:
        try:
            import rle  # noqa: F401  (pylibjpeg-rle: much faster than the pure-Python encoder)
        except ImportError:
            plugin = ""
    ds.compress(ts, frame, encoding_plugin=plugin, generate_instance_uid=False)


def body_volume(
    n_slices: int = 100,
    rows: int = 512,
    cols: int = 512,
    spacing: tuple[float, float, float] = (0.7, 0.7, 2.5),
    seed: int = 0,
) -> sitk.Image:
    """A simple axial HFS body in HU: soft tissue, fat rim, spine, a few organs, air outside."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = (float(s) for s in spacing)
    x = (np.arange(cols) - (cols - 1) / 2) * sx  # mm, patient left is +x
    y = (np.arange(rows) - (rows - 1) / 2) * sy  # mm, posterior is +y
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * sz
    fov = min(cols * sx, rows * sy)
    ax, ay = 0.42 * fov, 0.30 * fov  # body half-axes
    X, Y = np.meshgrid(x, y)  # (rows, cols)
    r2 = (X / ax) ** 2 + (Y / ay) ** 2
    slice2d = np.full((rows, cols), -1000, dtype=np.int16)
    slice2d[r2 <= 1.0] = -100  # fat rim
    slice2d[r2 <= 0.85**2] = 45  # soft tissue
    spine = ((X / (0.06 * fov)) ** 2 + ((Y - 0.20 * fov) / (0.06 * fov)) ** 2) <= 1
    slice2d[spine] = 700
    canal = ((X / (0.02 * fov)) ** 2 + ((Y - 0.20 * fov) / (0.02 * fov)) ** 2) <= 1
    slice2d[canal] = 20
    vol = np.broadcast_to(slice2d, (n_slices, rows, cols)).copy()

    def ellipsoid(center: tuple[float, float, float], radii: tuple[float, float, float], hu: int) -> None:
        cx, cy, cz = center
        rx, ry, rz = radii
        i0, i1 = np.searchsorted(x, [cx - rx, cx + rx])
        j0, j1 = np.searchsorted(y, [cy - ry, cy + ry])
        k0, k1 = np.searchsorted(z, [cz - rz, cz + rz])
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return
        m = (
            ((z[k0:k1, None, None] - cz) / rz) ** 2
            + ((y[None, j0:j1, None] - cy) / ry) ** 2
            + ((x[None, None, i0:i1] - cx) / rx) ** 2
        ) <= 1.0
        vol[k0:k1, j0:j1, i0:i1][m] = hu

    zl = z[-1] - z[0] if n_slices > 1 else sz
    jit = lambda s: float(rng.uniform(-s, s))  # noqa: E731
    ellipsoid((-0.18 * fov + jit(5), -0.02 * fov, jit(5)), (0.16 * fov, 0.14 * fov, 0.3 * zl + 20), 60)  # liver
    ellipsoid((0.22 * fov + jit(5), 0.06 * fov, jit(5)), (0.06 * fov, 0.08 * fov, 0.15 * zl + 15), 50)  # spleen
    ellipsoid((-0.10 * fov, 0.14 * fov, -0.2 * zl), (0.04 * fov, 0.05 * fov, 0.1 * zl + 15), 35)  # kidney R
    ellipsoid((0.10 * fov, 0.14 * fov, -0.2 * zl), (0.04 * fov, 0.05 * fov, 0.1 * zl + 15), 35)  # kidney L
    ellipsoid((0.03 * fov, 0.10 * fov, 0.0), (0.025 * fov, 0.025 * fov, 0.6 * zl), 150)  # aorta
    ellipsoid((0.08 * fov, -0.08 * fov, 0.15 * zl), (0.08 * fov, 0.06 * fov, 0.12 * zl + 10), -600)  # stomach air
    ellipsoid((-0.12 * fov, -0.08 * fov, -0.05 * zl), (0.025 * fov, 0.03 * fov, 0.05 * zl + 8), 5)  # gallbladder
    noise = rng.normal(0.0, 8.0, size=(rows, cols)).astype(np.int16)  # one 2D noise field, cheap
    body = slice2d > -500
    vol += np.where(body, noise, 0).astype(np.int16)[None]
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin((float(x[0]), float(y[0]), float(z[0])))
    return img


def make_ct_series(
    out_dir: Path,
    *,
    n_slices: int = 100,
    rows: int = 512,
    cols: int = 512,
    spacing: tuple[float, float, float] = (0.7, 0.7, 2.5),
    seed: int = 0,
    **write_kwargs,
) -> list[Path]:
    """Write a quick synthetic axial CT body series (see body_volume); returns the file paths."""
    vol = body_volume(n_slices, rows, cols, spacing, seed)
    return write_series(vol, Path(out_dir), seed=seed, **write_kwargs)
