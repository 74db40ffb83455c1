"""Organ windows: resampling, HU scaling, window placement, padding and field-of-view refusals."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ai_core.geometry import resample, resample_nearest
from ai_core.crops import (
    CropConfig,
    OrganWindowd,
    crop_organs,
    crop_window,
    padded_shape,
    scale_hu,
    window_bounds,
)

LABELS = {"liver": 1, "spleen": 2, "kidney_left": 5, "kidney_right": 4}
# Spacings that put no crop voxel centre exactly half-way between two source voxels, where
# nearest-neighbour ties would depend on the stored axis direction.
SMALL = CropConfig(spacing=(2.05, 2.05, 4.1), window=(8, 24, 24), patch=(4, 8, 8))


def phantom():
    """(z, y, x) = (30, 50, 60) at 1.5 x 1.5 x 3 mm: liver in the middle, spleen on the left edge."""
    hu = np.full((30, 50, 60), -1000, dtype=np.int16)
    lab = np.zeros(hu.shape, dtype=np.uint8)
    hu[2:28, 5:45, 5:55] = 40
    lab[8:20, 15:35, 10:30] = 1  # liver
    hu[lab == 1] = 60
    lab[10:16, 20:30, 50:60] = 2  # spleen, touches the x edge
    lab[18:22, 30:36, 36:42] = 5  # kidney_left, small
    lab[12:16, 36:40, 16:20] = 4  # kidney_right, near the liver
    img, labimg = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(lab)
    for im in (img, labimg):
        im.SetSpacing((1.5, 1.5, 3.0))
        im.SetOrigin((-45.0, -30.0, 100.0))
    return img, labimg


def test_scale_hu_clips_and_scales_in_place():
    a = np.array([-3000, -1150, 40, 350, 2000], dtype=np.float32)
    out = scale_hu(a, (-1150, 350))
    assert out is a and out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 1190 / 1500, 1, 1], rtol=1e-6)


def test_window_bounds_centre_enlarge_clamp():
    shape = (100, 200, 300)
    start, size = window_bounds((slice(40, 50), slice(90, 110), slice(100, 120)), shape, (20, 40, 60))
    assert size == (20, 40, 60) and start == (35, 80, 80)  # centred on the box
    start, size = window_bounds((slice(10, 70), slice(0, 10), slice(290, 300)), shape, (20, 40, 60))
    assert size == (60, 40, 60)  # enlarged to the organ
    assert start == (10, 0, 240)  # clamped to the volume
    start, size = window_bounds((slice(0, 100), slice(0, 10), slice(0, 10)), (50, 200, 300), (112, 40, 60))
    assert size[0] == 50 and start[0] == 0  # never larger than the volume
    start, size = window_bounds((slice(10, 70), slice(0, 10), slice(0, 10)), shape, (20, 40, 60), (30, 40, 60))
    assert size[0] == 30 and start[0] == 25  # capped by max_window, still centred
    assert padded_shape((50, 40, 61), (16, 16, 32)) == (64, 48, 64)


def test_crop_organs_windows_masks_and_refusals():
    img, lab = phantom()
    result = crop_organs(img, lab, LABELS, SMALL)
    assert set(result.crops) == {"liver", "kidney_left", "kidney_right"}
    assert "edge of the field of view" in result.not_evaluated["spleen"]
    liver = result.crops["liver"]
    assert liver.image.dtype == np.float32 and liver.image.shape[0] == 1
    assert all(s % p == 0 for s, p in zip(liver.image.shape[1:], SMALL.patch))
    assert all(s >= w for s, w in zip(liver.size, SMALL.window))
    assert 0.0 <= liver.image.min() and liver.image.max() <= 1.0
    # The liver (60 HU) reads (60 + 1150) / 1500 inside its mask, away from its border.
    inner = liver.masks["liver"] & (liver.image[0] > 0)
    assert np.median(liver.image[0][inner]) == pytest.approx(1210 / 1500, abs=1e-3)
    assert liver.inside_fraction == 1.0
    # The window is centred on the liver (the volume is big enough not to clamp it).
    centre = np.argwhere(liver.masks["liver"]).mean(0)
    assert np.all(np.abs(centre - (np.asarray(liver.size) - 1) / 2) <= 1.0)
    # Each window carries the masks of every organ inside it, and a label map in model order.
    assert "kidney_right" in liver.masks and liver.mask("kidney_right").any()
    assert not liver.mask("heart").any()
    lm = liver.label_map(["kidney", "liver"], groups={"kidney": ["kidney_left", "kidney_right"]})
    assert set(np.unique(lm)) <= {0, 1, 2} and (lm == 2).sum() == liver.masks["liver"].sum()
    # World coordinates of the window's liver centre match the source labels' centre.
    world = result.window_to_world("liver", centre)
    src = np.argwhere(sitk.GetArrayViewFromImage(lab) == 1).mean(0)[::-1]
    expected = lab.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in src))
    np.testing.assert_allclose(world, expected, atol=2.0)


def test_min_inside_and_groups():
    img, lab = phantom()
    capped = CropConfig(spacing=(2.0, 2.0, 4.0), window=(2, 4, 4), patch=(2, 4, 4), max_window=(2, 8, 8))
    result = crop_organs(img, lab, LABELS, capped, organs=["liver"])
    assert "fits in its window" in result.not_evaluated["liver"]
    result = crop_organs(img, lab, LABELS, SMALL, organs=["kidneys", "flank"],
                         groups={"kidneys": ["kidney_left", "kidney_right"], "flank": ["kidney_left", "spleen"]})
    assert set(result.crops) == {"kidneys"}
    assert {"kidney_left", "kidney_right"} <= set(result.crops["kidneys"].masks)
    assert "edge" in result.not_evaluated["flank"]
    result = crop_organs(img, lab, {"liver": 1, "heart": 9}, SMALL)
    assert result.not_evaluated["heart"].startswith("organ not found in the field of view")


def test_crops_do_not_depend_on_the_stored_orientation():
    img, lab = phantom()
    a = crop_organs(img, lab, LABELS, SMALL)
    b = crop_organs(sitk.DICOMOrient(img, "PIR"), sitk.DICOMOrient(lab, "PIR"), LABELS, SMALL)
    for organ in a.crops:
        np.testing.assert_allclose(a.crops[organ].image, b.crops[organ].image, atol=1e-4)
        np.testing.assert_array_equal(a.crops[organ].masks[organ], b.crops[organ].masks[organ])


def test_dict_wrapper_matches_array_logic():
    rng = np.random.default_rng(0)
    image = rng.random((1, 20, 30, 40), dtype=np.float32)
    labels = np.zeros((1, 20, 30, 40), dtype=np.uint8)
    labels[0, 5:9, 10:20, 30:38] = 1
    labels[0, 6:8, 12:14, 20:25] = 2
    config = CropConfig(window=(8, 16, 16), patch=(4, 8, 8))
    out = OrganWindowd("liver", {"liver": 1, "spleen": 2}, config)({"image": image, "label": labels})
    start = out["window_start"]
    win, masks = crop_window(image[0], labels[0], start, (8, 16, 16), (4, 8, 8), {"liver": 1, "spleen": 2, "x": 3})
    np.testing.assert_array_equal(out["image"], win)
    np.testing.assert_array_equal(out["label"][0] == 1, masks["liver"])
    assert set(masks) == {"liver", "spleen"}
    assert (out["label"][0] == 1).sum() == (labels == 1).sum()
    with pytest.raises(ValueError, match="cropping kidney"):
        OrganWindowd("kidney", {"kidney": 3}, config)({"image": image, "label": labels})


def test_config_validation():
    with pytest.raises(ValueError, match="orientation"):
        CropConfig(orientation="LPL")
    with pytest.raises(ValueError, match="hu_range"):
        CropConfig(hu_range=(350, -1150))


@pytest.mark.parametrize("code", ["LPS", "RAS", "PIR", "LIP"])
def test_fast_nearest_resampling_equals_simpleitk(code):
    rng = np.random.default_rng(1)
    lab = sitk.GetImageFromArray(rng.integers(0, 5, (13, 17, 11)).astype(np.uint8))
    lab.SetSpacing((3.1, 2.9, 4.3))
    lab.SetOrigin((-10.0, 5.0, 3.0))
    lab = sitk.DICOMOrient(lab, code)
    ref = sitk.Image(40, 50, 35, sitk.sitkInt16)
    ref.SetSpacing((0.9, 1.1, 1.3))
    ref.SetOrigin((-12.3, 2.2, 0.1))
    ref = sitk.DICOMOrient(ref, "RPI")
    fast = sitk.GetArrayFromImage(resample_nearest(lab, ref))
    slow = sitk.GetArrayFromImage(resample(lab, ref, interpolator=sitk.sitkNearestNeighbor))
    assert (slow > 0).mean() > 0.5  # the grids overlap mostly; outside is 0 in both
    np.testing.assert_array_equal(fast, slow)
