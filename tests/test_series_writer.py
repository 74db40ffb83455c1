"""The synthetic CT series writer: headers, geometry round trip, dciodvfy, transfer syntaxes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
import SimpleITK as sitk

from ai_core.phantom.series import (
    MANUFACTURER,
    ORIENTATIONS,
    TRANSFER_SYNTAXES,
    body_volume,
    make_ct_series,
    orientation_direction,
    write_series,
)


@pytest.fixture()
def strict_reading():
    old = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.reading_validation_mode = old


def _small(orientation: str = "HFS", seed: int = 3) -> sitk.Image:
    vol = body_volume(7, 40, 48, (4.0, 4.5, 5.0), seed)  # non-square, anisotropic: catches swaps
    vol.SetDirection(orientation_direction(orientation))
    vol.SetOrigin((-91.0, -77.5, 130.0))
    return vol


def _read_sitk(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(directory))
    reader.SetFileNames(names)
    return reader.Execute()


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy not found: install the Debian package dicom3tools"
    out = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_headers_are_realistic(tmp_path, strict_reading):
    vol = _small()
    paths = write_series(vol, tmp_path, seed=5, slice_thickness=5.0, patient_id="P-7")
    assert len(paths) == 7
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "CT" and ds.Manufacturer == MANUFACTURER
    assert ds.PatientID == "P-7" and ds.PatientPosition == "HFS"
    assert (ds.Rows, ds.Columns) == (40, 48)
    assert [float(v) for v in ds.PixelSpacing] == [4.5, 4.0]  # row spacing first
    assert float(ds.SliceThickness) == 5.0
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) <= -1024
    assert ds.KVP and ds.WindowCenter and ds.FrameOfReferenceUID and ds.AccessionNumber
    assert ds.StudyDate and ds.StudyTime
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert len(uids) == 7
    series = {pydicom.dcmread(p).SeriesInstanceUID for p in paths}
    assert series == {ds.SeriesInstanceUID}


def test_same_seed_same_uids_and_pixels(tmp_path):
    vol = _small()
    a = write_series(vol, tmp_path / "a", seed=11, slice_order="shuffled")
    b = write_series(vol, tmp_path / "b", seed=11, slice_order="shuffled")
    c = write_series(vol, tmp_path / "c", seed=12, slice_order="shuffled")
    for pa, pb in zip(a, b):
        assert pa.name == pb.name and pa.read_bytes() == pb.read_bytes()
    assert pydicom.dcmread(a[0]).SeriesInstanceUID != pydicom.dcmread(c[0]).SeriesInstanceUID


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_geometry_round_trip(tmp_path, orientation):
    vol = _small(orientation)
    write_series(vol, tmp_path, slice_order="shuffled", seed=1)
    img = _read_sitk(tmp_path)
    assert np.allclose(img.GetOrigin(), vol.GetOrigin(), atol=1e-3)
    assert np.allclose(img.GetSpacing(), vol.GetSpacing(), atol=1e-4)
    assert np.allclose(img.GetDirection(), vol.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(vol))


def test_left_handed_stack_is_found_by_position(tmp_path):
    """A slice axis against the plane normal: readers sorting by position get a flipped k axis."""
    vol = _small()
    d = np.eye(3)
    d[2, 2] = -1.0
    vol.SetDirection(tuple(d.ravel()))
    write_series(vol, tmp_path, slice_order="descending")
    img = _read_sitk(tmp_path)
    ref = sitk.GetArrayFromImage(vol)
    assert np.array_equal(sitk.GetArrayFromImage(img), ref[::-1])
    last = vol.TransformIndexToPhysicalPoint((0, 0, vol.GetSize()[2] - 1))
    assert np.allclose(img.GetOrigin(), last, atol=1e-3)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_instance_numbers_follow_slice_order(tmp_path, order):
    vol = _small()
    paths = write_series(vol, tmp_path, slice_order=order, seed=4)
    z = []
    inst = []
    for p in paths:  # returned in the volume's k order
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        z.append(float(ds.ImagePositionPatient[2]))
        inst.append(int(ds.InstanceNumber))
        assert p.name == f"CT{int(ds.InstanceNumber):04d}.dcm"
    assert z == sorted(z)
    assert sorted(inst) == list(range(1, 8))
    if order == "ascending":
        assert inst == list(range(1, 8))
    elif order == "descending":
        assert inst == list(range(7, 0, -1))
    else:
        assert inst not in (list(range(1, 8)), list(range(7, 0, -1)))


@pytest.mark.parametrize("orientation", ["HFS", "sagittal", "oblique"])
def test_dciodvfy_no_errors(tmp_path, orientation):
    paths = write_series(_small(orientation), tmp_path, slice_order="shuffled")
    for p in (paths[0], paths[-1]):
        assert _dciodvfy_errors(p) == []


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_transfer_syntaxes_decode_to_identical_hu(tmp_path, name, strict_reading):
    vol = _small()
    ref = sitk.GetArrayFromImage(vol)
    paths = write_series(vol, tmp_path, transfer_syntax=TRANSFER_SYNTAXES[name], slice_order="shuffled")
    assert _dciodvfy_errors(paths[0]) == []
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]
        hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
        assert np.array_equal(hu, ref[k]), f"slice {k} differs after {name}"
    img = _read_sitk(tmp_path)  # GDCM decodes every syntax, too
    assert np.array_equal(sitk.GetArrayFromImage(img), ref)


def test_transfer_syntax_short_name_and_bad_name(tmp_path):
    paths = write_series(_small(), tmp_path, transfer_syntax="rle")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        write_series(_small(), tmp_path / "x", transfer_syntax="jpeg-lossy")


def test_make_ct_series_has_organs_and_is_fast(tmp_path):
    t0 = time.perf_counter()
    paths = make_ct_series(tmp_path, n_slices=40, rows=256, cols=256, spacing=(1.4, 1.4, 5.0))
    elapsed = time.perf_counter() - t0
    assert len(paths) == 40
    assert elapsed < 5.0, f"40 slices of 256x256 took {elapsed:.1f} s"
    img = _read_sitk(tmp_path)
    a = sitk.GetArrayFromImage(img)
    assert a.min() <= -990  # air outside
    assert a.max() >= 500  # spine
    values = set(np.unique(a[20]).tolist())
    assert len(values) > 20  # noise, several tissues
    body = a[20][a[20] > -500]
    assert -150 < np.median(body) < 100
