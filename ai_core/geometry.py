"""Geometry helpers shared by segmentation and cropping: resampling grids and RAS affines.

SimpleITK images are in LPS with arrays indexed (z, y, x); MONAI MetaTensors are channel-first
(C, x, y, z) with a RAS affine. These helpers convert between the two without losing geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 index (x, y, z) -> LPS mm affine of a SimpleITK image."""
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d * np.asarray(image.GetSpacing(), dtype=np.float64)
    a[:3, 3] = image.GetOrigin()
    return a


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 index (x, y, z) -> RAS mm affine (MONAI/NIfTI convention) of a SimpleITK image."""
    return _LPS_TO_RAS @ lps_affine(image)


def set_geometry_from_ras(image: sitk.Image, affine_ras: np.ndarray) -> sitk.Image:
    """Give ``image`` (array order z, y, x) the grid of a RAS affine over index (x, y, z)."""
    a = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (a[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    return image


def image_from_xyz(array_xyz: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image from an (x, y, z) array (MONAI order) and its RAS affine."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz).transpose(2, 1, 0)))
    return set_geometry_from_ras(image, affine_ras)


def resampled_grid(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """An empty reference image on the same extent and direction as ``image`` at a new spacing.

    The new grid covers the old one's extent (voxel edges to voxel edges) and is centred on it.
    """
    old_sp = np.asarray(image.GetSpacing(), dtype=np.float64)
    new_sp = np.asarray(spacing, dtype=np.float64)
    old_size = np.asarray(image.GetSize())
    extent = old_size * old_sp
    new_size = [max(1, math.ceil(e / s - 1e-6)) for e, s in zip(extent, new_sp)]
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    # Centre of the old grid in index units of the new one: shift so both grids share the centre.
    old_first_edge = np.asarray(image.GetOrigin()) - d @ (old_sp / 2)
    slack = (np.asarray(new_size) * new_sp - extent) / 2
    origin = old_first_edge + d @ (new_sp / 2 - slack)
    ref = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in new_sp))
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(tuple(float(v) for v in origin))
    return ref


def resample(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    interpolator: int = sitk.sitkLinear,
    pixel_type: int | None = None,
    default: float = 0.0,
) -> sitk.Image:
    """Resample onto the grid of ``reference`` (identity transform), e.g. to float32 HU, no float64 copy."""
    return sitk.Resample(
        image,
        reference,
        sitk.Transform(),
        interpolator,
        float(default),
        image.GetPixelID() if pixel_type is None else pixel_type,
    )


def _signed_permutation(a: np.ndarray, tol: float = 1e-4) -> np.ndarray | None:
    """``a`` rounded to a signed permutation matrix, or None if it is not one."""
    m = np.round(a)
    if np.abs(a - m).max() > tol or not np.array_equal(np.abs(m).sum(0), np.ones(3)) \
            or not np.array_equal(np.abs(m).sum(1), np.ones(3)):
        return None
    return m


def resample_nearest(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (0 outside).

    When the two grids' axes are parallel (any permutation or flip, the usual case of a coarse
    network grid and the source grid), indexing is separable per axis and done with three
    ``np.take``; otherwise SimpleITK resamples.
    """
    d_l = np.asarray(labels.GetDirection()).reshape(3, 3)
    d_r = np.asarray(reference.GetDirection()).reshape(3, 3)
    m = _signed_permutation(d_l.T @ d_r)
    if m is None:
        return resample(labels, reference, interpolator=sitk.sitkNearestNeighbor)
    sp_l, sp_r = np.asarray(labels.GetSpacing()), np.asarray(reference.GetSpacing())
    size_l, size_r = labels.GetSize(), reference.GetSize()
    offset = d_l.T @ (np.asarray(reference.GetOrigin()) - np.asarray(labels.GetOrigin()))
    src = sitk.GetArrayViewFromImage(labels)
    # For each reference axis b, the labels axis a it runs along and the indices it visits;
    # indices outside the labels are read at 0 and cleared afterwards (no padded copy).
    order, index, outside = [], [], []
    for b in range(3):
        a = int(np.flatnonzero(m[:, b])[0])
        c = (offset[a] + m[a, b] * sp_r[b] * np.arange(size_r[b])) / sp_l[a]
        i = np.floor(c + 0.5).astype(np.intp)
        bad = (i < 0) | (i >= size_l[a])
        i[bad] = 0
        order.append(a)
        index.append(i)
        outside.append(np.flatnonzero(bad))
    # Numpy axes are reversed (z, y, x): put the labels' axes in the reference's order, then take.
    out = src.transpose([2 - order[2], 2 - order[1], 2 - order[0]])
    for axis, b in enumerate((2, 1, 0)):
        out = np.take(out, index[b], axis=axis)
    out[outside[2]] = 0
    out[:, outside[1]] = 0
    out[:, :, outside[0]] = 0
    image = sitk.GetImageFromArray(np.ascontiguousarray(out))
    image.CopyInformation(reference)
    return image
