"""Organ windows for the VLP model, as the fVLM reference prepares them.

The HU volume is resampled (SimpleITK, linear, float32) to the configured spacing on a grid in a
canonical orientation (default LPS: arrays are (D, H, W) = (z inferior->superior, y anterior->
posterior, x right->left)), clipped to a HU window and scaled to 0..1. Each organ gets a window of
at least ``window`` voxels centred on its bounding box, enlarged when the organ is larger, clamped
to the volume and padded at the end to multiples of ``patch``. Each window carries the labels of
every organ inside it (``OrganCrop.mask``, ``label_map``), since a model may pool several organs
from one window.

An organ that touches the edge of the field of view (it may be cut off), or of which less than
``min_inside`` of the voxels fit in its window (``max_window`` caps the size), is not evaluated,
with that reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ai_core.geometry import resample, resample_nearest
from ai_core.volume import CTVolume

logger = logging.getLogger(__name__)

_AXIS_OF_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class CropConfig:
    """Sizes of the crop stage; the defaults are the fVLM reference's."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)  # mm along x, y, z
    window: tuple[int, int, int] = (112, 288, 352)  # minimum (D, H, W) voxels
    patch: tuple[int, int, int] = (16, 16, 32)  # (D, H, W): windows are padded to multiples
    hu_range: tuple[float, float] = (-1150.0, 350.0)  # clipped, then scaled to 0..1
    orientation: str = "LPS"  # axis directions of the resampled grid (x, y, z)
    min_inside: float = 0.9  # fraction of the organ's voxels that must fit in its window
    max_window: tuple[int, int, int] | None = None  # cap on the enlarged window, (D, H, W)

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"crop spacing must be three positive mm values, got {self.spacing}")
        if any(w < 1 for w in self.window) or any(p < 1 for p in self.patch):
            raise ValueError(f"crop window {self.window} and patch {self.patch} must be positive")
        if self.hu_range[0] >= self.hu_range[1]:
            raise ValueError(f"crop hu_range must be (low, high) with low < high, got {self.hu_range}")
        axes = [_AXIS_OF_LETTER.get(c, (None,))[0] for c in self.orientation.upper()]
        if sorted(a for a in axes if a is not None) != [0, 1, 2]:
            raise ValueError(f"crop orientation {self.orientation!r} must name three different axes, e.g. LPS")
        if not 0 < self.min_inside <= 1:
            raise ValueError(f"crop min_inside must be in (0, 1], got {self.min_inside}")

    @classmethod
    def from_preprocess(cls, pre, **overrides) -> CropConfig:
        """From a VLP model spec's ``preprocess`` (spacing_mm, hu_window, min_window, min_inside_fraction)."""
        values = dict(
            spacing=tuple(pre.spacing_mm), hu_range=tuple(pre.hu_window), window=tuple(pre.min_window),
            min_inside=float(pre.min_inside_fraction),
        )
        values.update(overrides)
        return cls(**values)


@dataclass
class OrganCrop:
    """One organ's window: image (1, D, H, W) float32 in 0..1 and the labels of every organ in it."""

    organ: str
    image: np.ndarray  # float32 (1, D, H, W)
    labels: np.ndarray  # uint8 (D, H, W): the segmentation's labels in the window (0 in padding)
    organ_labels: dict[str, int]  # organs with voxels in the window -> their value in ``labels``
    start: tuple[int, int, int]  # first voxel of the window in the resampled grid (D, H, W)
    size: tuple[int, int, int]  # voxels taken from the grid before padding (D, H, W)
    inside_fraction: float  # of the organ's voxels that are in the window

    def mask(self, organ: str) -> np.ndarray:
        """Bool (D, H, W) mask of an organ in the window (all False if it is not there)."""
        value = self.organ_labels.get(organ)
        return self.labels == value if value is not None else np.zeros(self.labels.shape, dtype=bool)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Every organ in the window -> its bool mask (computed on each access)."""
        return {organ: self.labels == value for organ, value in self.organ_labels.items()}

    def label_map(self, organs: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
        """A (D, H, W) uint8 map with organ ``organs[i]`` labelled ``i + 1`` (a group is its members' union)."""
        lut = np.zeros(256, dtype=np.uint8)
        for i, name in enumerate(organs):
            for member in (groups or {}).get(name, (name,)):
                if member in self.organ_labels:
                    lut[self.organ_labels[member]] = i + 1
        return lut[self.labels]


@dataclass
class CropSet:
    """The crops of one volume, the organs not evaluated (with reasons) and the resampled grid."""

    crops: dict[str, OrganCrop] = field(default_factory=dict)
    not_evaluated: dict[str, str] = field(default_factory=dict)  # organ -> reason
    grid: sitk.Image | None = None  # geometry of the resampled volume (index (x, y, z) = array [D, H, W] reversed)

    def window_to_world(self, organ: str, dhw: Sequence[float]) -> tuple[float, float, float]:
        """LPS mm of a (D, H, W) voxel position inside an organ's window."""
        crop = self.crops[organ]
        d, h, w = (float(a) + s for a, s in zip(dhw, crop.start))
        return tuple(self.grid.TransformContinuousIndexToPhysicalPoint((w, h, d)))  # type: ignore[union-attr]


# -- array logic -------------------------------------------------------------------------------


def scale_hu(array: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``hu_range`` and scale to 0..1, in place for float32 arrays."""
    lo, hi = (float(v) for v in hu_range)
    if array.dtype == np.float32 and array.flags.writeable:
        out = np.clip(array, lo, hi, out=array)
    else:  # one pass that clips and copies (e.g. from a read-only SimpleITK view)
        out = np.clip(array, lo, hi).astype(np.float32, copy=False)
    out -= lo
    out *= np.float32(1.0 / (hi - lo))
    return out


def window_bounds(
    bbox: tuple[slice, slice, slice],
    shape: Sequence[int],
    window: Sequence[int],
    max_window: Sequence[int] | None = None,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, size) of a window centred on ``bbox``: at least ``window``, as large as the box, clamped."""
    start, size = [], []
    for k, sl in enumerate(bbox):
        extent = sl.stop - sl.start
        n = max(int(window[k]), extent)
        if max_window is not None:
            n = min(n, int(max_window[k]))
        n = min(n, int(shape[k]))
        centre = (sl.start + sl.stop) / 2
        s = int(math.floor(centre - n / 2 + 0.5))
        s = min(max(s, 0), int(shape[k]) - n)
        start.append(s)
        size.append(n)
    return tuple(start), tuple(size)  # type: ignore[return-value]


def padded_shape(size: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """``size`` rounded up to multiples of ``patch``."""
    return tuple(int(math.ceil(s / p) * p) for s, p in zip(size, patch))  # type: ignore[return-value]


def crop_window_labels(
    image: np.ndarray,
    labels: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    patch: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a (D, H, W) window from a scaled image and its labels, padded at the end to ``patch``.

    Returns the (1, D', H', W') float32 image (padding 0 = the bottom of the HU window) and the
    (D', H', W') uint8 labels (padding 0).
    """
    sl = tuple(slice(s, s + n) for s, n in zip(start, size))
    inner = tuple(slice(0, n) for n in size)
    shape = padded_shape(size, patch)
    out = np.zeros((1, *shape), dtype=np.float32)
    out[(0, *inner)] = image[sl]
    lab = np.zeros(shape, dtype=np.uint8)
    lab[inner] = labels[sl]
    return out, lab


def crop_window(
    image: np.ndarray,
    labels: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    patch: Sequence[int],
    label_values: Mapping[str, int],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Like ``crop_window_labels``, with a bool mask per organ of ``label_values`` present in the window."""
    out, lab = crop_window_labels(image, labels, start, size, patch)
    counts = np.bincount(lab.ravel(), minlength=256)
    return out, {organ: lab == value for organ, value in label_values.items() if counts[value]}


def touches_edge(bbox: tuple[slice, ...], shape: Sequence[int]) -> bool:
    """Whether a bounding box reaches a face of the array."""
    return any(sl.start == 0 or sl.stop == n for sl, n in zip(bbox, shape))


# -- volume level ------------------------------------------------------------------------------


def oriented_grid(image: sitk.Image, spacing: Sequence[float], orientation: str = "LPS") -> sitk.Image:
    """An empty grid in ``orientation`` at ``spacing`` covering the physical extent of ``image``."""
    cols = np.zeros((3, 3))
    for j, letter in enumerate(orientation.upper()):
        axis, sign = _AXIS_OF_LETTER[letter]
        cols[axis, j] = sign
    size = np.asarray(image.GetSize())
    sp = np.asarray(image.GetSpacing())
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    world = np.asarray(image.GetOrigin()) + (corners * sp) @ d.T
    along = world @ cols  # coordinates along the new axes
    lo, hi = along.min(0), along.max(0)
    new_sp = np.asarray(spacing, dtype=float)
    n = np.maximum(1, np.ceil((hi - lo) / new_sp - 1e-6)).astype(int)
    first = (lo + hi) / 2 - (n - 1) * new_sp / 2  # centre the new grid on the old extent
    ref = sitk.Image([int(v) for v in n], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(v) for v in new_sp))
    ref.SetDirection(tuple(float(v) for v in cols.ravel()))
    ref.SetOrigin(tuple(float(v) for v in cols @ first))
    return ref


def resample_for_crops(
    volume: CTVolume | sitk.Image, labels: sitk.Image, config: CropConfig
) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    """Scaled image (D, H, W) float32 and labels (D, H, W) uint8 on the crop grid, and that grid."""
    image = volume.image if isinstance(volume, CTVolume) else volume
    grid = oriented_grid(image, config.spacing, config.orientation)
    hu = resample(image, grid, pixel_type=sitk.sitkFloat32, default=config.hu_range[0])
    scaled = scale_hu(sitk.GetArrayViewFromImage(hu), config.hu_range)  # clip copies out of the view
    del hu
    lab = resample_nearest(labels, grid)
    return scaled, sitk.GetArrayFromImage(lab), grid


def crop_organs(
    volume: CTVolume | sitk.Image,
    labels: sitk.Image,
    organ_labels: Mapping[str, int],
    config: CropConfig = CropConfig(),
    *,
    organs: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> CropSet:
    """Windows of ``organs`` (default: every organ in ``organ_labels``) from a volume and its labels.

    ``groups`` names windows made of several catalogue organs (e.g. fVLM "lung" = both lungs):
    such a window is centred on the union and evaluated only if every member is.
    """
    groups = dict(groups or {})
    wanted = list(organs) if organs is not None else list(organ_labels)
    result = CropSet()

    # Field-of-view check on the source grid, where the edges are the acquisition's: an organ
    # with voxels on a face of the volume may continue outside it. Only the faces are read.
    src = sitk.GetArrayViewFromImage(labels)
    faces = (src[0], src[-1], src[:, 0], src[:, -1], src[:, :, 0], src[:, :, -1])
    on_edge = set().union(*(np.unique(f).tolist() for f in faces))
    fov_reason = {
        organ: "organ touches the edge of the field of view (it may be cut off)"
        for organ, value in organ_labels.items()
        if value in on_edge
    }

    members_of = {name: tuple(groups.get(name, (name,))) for name in wanted}
    todo = []
    for name, members in members_of.items():
        unknown = [m for m in members if m not in organ_labels]
        reasons = [fov_reason[m] for m in members if m in fov_reason]
        if unknown:
            result.not_evaluated[name] = f"the segmenter does not segment {', '.join(unknown)}"
        elif reasons:
            result.not_evaluated[name] = reasons[0]
        else:
            todo.append(name)
    if not todo:
        return result

    scaled, lab, grid = resample_for_crops(volume, labels, config)
    result.grid = grid
    boxes = ndimage.find_objects(lab)
    counts = np.bincount(lab.ravel(), minlength=256)
    for name in todo:
        values = [organ_labels[m] for m in members_of[name]]
        member_boxes = [boxes[v - 1] for v in values if v <= len(boxes) and boxes[v - 1] is not None]
        if len(member_boxes) < len(values):
            result.not_evaluated[name] = "organ not found in the field of view (or too small at the crop spacing)"
            continue
        box = tuple(slice(min(b[k].start for b in member_boxes), max(b[k].stop for b in member_boxes))
                    for k in range(3))
        start, size = window_bounds(box, lab.shape, config.window, config.max_window)
        image, window_labels = crop_window_labels(scaled, lab, start, size, config.patch)
        in_window = np.bincount(window_labels.ravel(), minlength=256)
        inside = int(sum(in_window[v] for v in values))
        total = int(sum(counts[v] for v in values))
        fraction = inside / total if total else 0.0
        if fraction < config.min_inside:
            result.not_evaluated[name] = (
                f"only {fraction:.0%} of the organ fits in its window (at least {config.min_inside:.0%} needed)"
            )
            continue
        present = {o: v for o, v in organ_labels.items() if in_window[v]}
        result.crops[name] = OrganCrop(name, image, window_labels, present, start, size, fraction)
    return result


# -- MONAI-style dictionary wrapper --------------------------------------------------------------


class OrganWindowd:
    """Dictionary transform: {image (1, D, H, W) scaled, label (1, D, H, W)} -> one organ's window.

    For training pipelines that already hold arrays on the crop grid; ``organ_labels`` maps organ
    names to label values. Writes ``image``, ``label`` (the window's labels) and ``window_start``.
    """

    def __init__(
        self,
        organ: str,
        organ_labels: Mapping[str, int],
        config: CropConfig = CropConfig(),
        keys: tuple[Hashable, Hashable] = ("image", "label"),
    ):
        self.organ, self.organ_labels, self.config, self.keys = organ, dict(organ_labels), config, keys

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image_key, label_key = self.keys
        image = np.asarray(d[image_key])[0]
        labels = np.asarray(d[label_key])[0]
        box = ndimage.find_objects((labels == self.organ_labels[self.organ]).astype(np.uint8))
        if not box or box[0] is None:
            raise ValueError(f"cropping {self.organ}: the organ has no voxels in this label map")
        start, size = window_bounds(box[0], labels.shape, self.config.window, self.config.max_window)
        win, lab = crop_window_labels(image, labels, start, size, self.config.patch)
        d[image_key], d[label_key], d["window_start"] = win, lab[None], start
        return d
