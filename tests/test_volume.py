"""Reading CT series into oriented HU volumes, and refusing what cannot be analysed safely."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ai_core.phantom.series import write_series
from ai_core.volume import CTVolume, VolumeRefused, image_to_labels, labels_to_image, read_volume

# Orientation name of the series writer -> the DICOMOrient code of the same direction matrix.
ORIENT_CODES = {"HFS": "LPS", "FFS": "RPI", "HFP": "RAS", "FFP": "LAI", "sagittal": "PIR", "coronal": "LIP"}
MARKERS = {300: (slice(2, 4), slice(3, 6), slice(2, 5)), -500: (slice(8, 11), slice(15, 20), slice(12, 17)),
           1200: (slice(5, 6), slice(10, 11), slice(16, 18))}


def phantom() -> sitk.Image:
    """A small asymmetric HFS volume, non-square pixels, with marker blocks of distinct HU.

    Every side is at least 32 voxels: OpenJPEG's default 6 resolution levels need that.
    """
    arr = np.full((32, 36, 40), -1000, dtype=np.int16)
    arr[:, 4:20, 3:17] = 40
    for hu, idx in MARKERS.items():
        arr[idx] = hu
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.6, 2.5))
    img.SetOrigin((-7.5, 12.25, -101.0))
    return img


def world_of(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """World (LPS mm) coordinates of the voxels of a (z, y, x) mask, sorted for set comparison."""
    zyx = np.argwhere(mask)
    ijk = zyx[:, ::-1].astype(float)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    pts = np.asarray(image.GetOrigin()) + (ijk * np.asarray(image.GetSpacing())) @ d.T
    return pts[np.lexsort(pts.T[::-1])].round(3)


def assert_same_physical_volume(vol: CTVolume, reference: sitk.Image) -> None:
    got = sitk.DICOMOrient(vol.image, "LPS")
    assert got.GetSize() == reference.GetSize()
    np.testing.assert_allclose(got.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(got.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(reference))
    # And on the read grid itself: each marker sits at the same world coordinates.
    arr = vol.array_view()
    ref = sitk.GetArrayViewFromImage(reference)
    for hu in MARKERS:
        np.testing.assert_allclose(world_of(vol.image, arr == hu), world_of(reference, ref == hu), atol=1e-3)


@pytest.mark.parametrize(
    "orientation, order, syntax",
    [
        ("HFS", "ascending", "explicit"),
        ("HFS", "descending", "implicit"),
        ("FFS", "shuffled", "explicit"),
        ("HFP", "descending", "rle"),
        ("FFP", "shuffled", "jpegls"),
        ("sagittal", "shuffled", "jpeg2000"),
        ("coronal", "descending", "jpeg-lossless"),
    ],
)
def test_same_phantom_reads_back_identically(tmp_path, orientation, order, syntax):
    ref = phantom()
    stored = sitk.DICOMOrient(ref, ORIENT_CODES[orientation])
    write_series(stored, tmp_path, slice_order=order, transfer_syntax=syntax)
    vol = read_volume(tmp_path)
    assert vol.image.GetPixelID() == sitk.sitkInt16
    d = np.asarray(vol.image.GetDirection()).reshape(3, 3)
    assert np.linalg.det(d) == pytest.approx(1.0)
    assert_same_physical_volume(vol, ref)


def test_slice_i_is_file_i_and_matches_simpleitk(tmp_path):
    ref = phantom()
    write_series(sitk.DICOMOrient(ref, "RPI"), tmp_path, slice_order="shuffled", seed=3)
    vol = read_volume(sorted(tmp_path.iterdir(), reverse=True))
    arr = vol.array_view()
    for i, f in enumerate(vol.files):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(arr[i], hu)
    # The kept headers (which the result encoders use instead of reading the files again) are
    # the files' headers in slice order, without the pixel data.
    assert len(vol.headers) == len(vol.files)
    for f, header in zip(vol.files, vol.headers):
        assert "PixelData" not in header
        assert header == pydicom.dcmread(f, stop_before_pixels=True)
    # GDCM's own series reader (an independent implementation) agrees on grid and voxels.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path)))
    other = reader.Execute()
    resampled = sitk.Resample(other, vol.image, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(resampled), arr)


def test_multiframe_enhanced_ct(tmp_path):
    import highdicom as hd

    ref = phantom()
    single = tmp_path / "single"
    write_series(sitk.DICOMOrient(ref, "RPI"), single, slice_order="shuffled")
    datasets = [pydicom.dcmread(p) for p in sorted(single.iterdir())]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, hd.UID(), 2, hd.UID(), 1, transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian
    )
    out = tmp_path / "mf" / "enhanced.dcm"
    out.parent.mkdir()
    mf.save_as(out)
    vol = read_volume(out)
    assert vol.files == [out] * 32
    assert sorted(vol.frame_numbers) == list(range(1, 33))
    assert vol.headers is None  # the encoders do not take multi-frame sources
    assert_same_physical_volume(vol, ref)


def test_float_rescale_gives_float32(tmp_path):
    write_series(phantom(), tmp_path)
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = "0.5"
        ds.save_as(f)
    vol = read_volume(tmp_path)
    assert vol.image.GetPixelID() == sitk.sitkFloat32
    ds = pydicom.dcmread(vol.files[0])
    np.testing.assert_allclose(vol.array_view()[0], ds.pixel_array * 0.5 + float(ds.RescaleIntercept))


def test_label_round_trip(tmp_path):
    write_series(sitk.DICOMOrient(phantom(), "PIR"), tmp_path, slice_order="shuffled")
    vol = read_volume(tmp_path)
    labels = (vol.array_view() == 300).astype(np.uint8) * 7
    img = labels_to_image(labels, vol)
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(image_to_labels(img, vol), labels)
    # A label image on another grid (coarser, reoriented) comes back by nearest neighbour.
    coarse = sitk.Resample(sitk.DICOMOrient(img, "LPS"), sitk.DICOMOrient(img, "LPS"))
    back = image_to_labels(coarse, vol)
    np.testing.assert_array_equal(back, labels)
    with pytest.raises(ValueError, match="shape"):
        labels_to_image(labels[1:], vol)


# --- refusals ---------------------------------------------------------------------------------


def _series(tmp_path: Path, name: str = "s", **kw) -> list[Path]:
    return write_series(phantom(), tmp_path / name, **kw)


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for k, v in values.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


def _refusal(paths) -> str:
    with pytest.raises(VolumeRefused) as info:
        read_volume(paths)
    return info.value.reason


def test_refuses_mixed_series(tmp_path):
    a = _series(tmp_path, "a", series_number=1)
    b = _series(tmp_path, "b", series_number=2)
    assert "mixed series" in _refusal(a + b)


def test_refuses_mixed_orientation(tmp_path):
    files = _series(tmp_path)
    _edit(files[3], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert "different orientations" in _refusal(files)


def test_refuses_mixed_sizes(tmp_path):
    files = _series(tmp_path)
    small = sitk.GetImageFromArray(np.zeros((32, 10, 10), np.int16))
    small.SetSpacing((0.8, 0.6, 2.5))
    other = write_series(small, tmp_path / "small", series_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID),
                         frame_of_reference_uid=str(pydicom.dcmread(files[0]).FrameOfReferenceUID), seed=9)
    assert "different sizes" in _refusal(files[:6] + other[6:])


def test_refuses_missing_position(tmp_path):
    files = _series(tmp_path)
    _edit(files[5], ImagePositionPatient=None)
    assert "Image Position" in _refusal(files)


def test_refuses_duplicate_position(tmp_path):
    files = _series(tmp_path)
    dup = tmp_path / "s" / "dup.dcm"
    shutil.copy(files[4], dup)
    _edit(dup, SOPInstanceUID=pydicom.uid.generate_uid())
    assert "duplicate slice position" in _refusal(tmp_path / "s")


def test_the_same_instance_twice_is_read_once(tmp_path):
    files = _series(tmp_path)
    shutil.copy(files[4], tmp_path / "s" / "copy.dcm")
    assert read_volume(tmp_path / "s").shape == (32, 36, 40)


def test_refuses_gap(tmp_path):
    files = _series(tmp_path)
    assert "missing slices" in _refusal(files[:5] + files[6:])


def test_refuses_irregular_spacing(tmp_path):
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[6])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    _edit(files[6], ImagePositionPatient=[x, y, z + 0.8])
    assert "irregular slice spacing" in _refusal(files)


def test_refuses_localizer(tmp_path):
    files = _series(tmp_path)
    for f in files:
        _edit(f, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "localizer" in _refusal(files)


def test_refuses_gantry_tilt(tmp_path):
    files = _series(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        # 15° tilt: each slice shifts along y by tan(15°) times its offset along z.
        _edit(f, ImagePositionPatient=[x, round(y + np.tan(np.radians(15)) * (z + 101.0), 4), z],
              GantryDetectorTilt="15")
    assert "gantry tilt" in _refusal(files)


def test_refuses_too_few_slices(tmp_path):
    files = _series(tmp_path)
    assert "too few slices" in _refusal(files[:4])


def test_refuses_non_ct_and_empty(tmp_path):
    files = _series(tmp_path)
    for f in files:
        _edit(f, Modality="MR")
    assert "not CT" in _refusal(files)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    assert "no DICOM images" in _refusal(tmp_path / "empty")
