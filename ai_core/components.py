"""Connected-component clean-up of organ label maps, as segmentation backends return them.

- ``keep_largest_components``: a fragment far from its organ inflates the organ's bounding box
  (so its window), lowers its Dice, and, when it lies on a face of the volume, makes the organ
  "touch the edge of the field of view" so it is not evaluated at all. Every catalogue organ is
  one connected structure, so only the largest component of each class is kept.
- ``fill_enclosed_background``: background that one organ surrounds on every side joins it.
- ``fill_fluid_notches``: fluid-density background in a notch of an organ's surface joins it (a
  cyst at the surface that the network left out); a bundle asks for it in its metadata.

Connected components of a 78-million-voxel source grid take seconds; on a network's coarse grid
(about a million voxels) a fraction of a second. So ``MonaiBundleSegmenter`` cleans its classes on
its own grid, after mapping them to catalogue organs and before bringing them to the source grid;
the training of the findings model (``train vlp --segmenter``) gets the very same masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)


def keep_largest_components(classes: np.ndarray) -> np.ndarray:
    """Each non-zero class value reduced to its largest face-connected component (others become 0)."""
    classes = np.ascontiguousarray(classes)
    if not classes.any():
        return classes.copy()
    f = sitk.ScalarConnectedComponentImageFilter()
    f.SetDistanceThreshold(0.0)  # voxels of equal value only
    f.FullyConnectedOff()
    comp = sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(classes)))
    comp[classes == 0] = 0  # background forms components too; they are not organs
    sizes = np.bincount(comp.ravel())
    class_of = np.zeros(sizes.size, dtype=np.int64)
    class_of[comp.ravel()] = classes.ravel()
    # For each class, the component with the most voxels.
    ids = np.flatnonzero(sizes)
    ids = ids[ids != 0]
    order = np.lexsort((-sizes[ids], class_of[ids]))  # by class, largest first
    ids, cls = ids[order], class_of[ids[order]]
    first = np.concatenate([[True], cls[1:] != cls[:-1]])
    keep = np.zeros(sizes.size, dtype=bool)
    keep[ids[first]] = True
    dropped = int(sizes[ids[~first]].sum())
    if dropped:
        logger.debug("removed %d voxels in %d fragments", dropped, int((~first).sum()))
    return np.where(keep[comp], classes, 0).astype(classes.dtype)


def fill_enclosed_background(labels: np.ndarray) -> int:
    """Give each organ the background voxels it encloses (in place); returns how many changed.

    A network that has seen few cysts or hypodense lesions tends to leave them out of their
    organ, as a hole in its mask: the organ's volume comes out short, and the findings model,
    which reads the organ through its mask, loses sight of exactly the spot that matters. Organ
    masks (TotalSegmentator's, the phantoms') include such spots, so background that one organ
    surrounds on every side (6-connected, in 3D) joins it. Voxels of other organs are never
    relabelled, and a spot open to the outside of the organ is left as it is.
    """
    from scipy import ndimage

    changed = 0
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        sub = labels[box]
        outside, n = ndimage.label(sub != value)
        if n == 0:
            continue
        # components that reach the box's faces are connected to the rest of the volume
        faces = np.zeros(n + 1, dtype=bool)
        for axis in range(sub.ndim):
            for index in (0, -1):
                faces[np.take(outside, index, axis=axis)] = True
        holes = ~faces[outside] & (sub == 0)
        count = int(holes.sum())
        if count:
            sub[holes] = value
            changed += count
    return changed


def _ellipsoid(radius: tuple[int, ...]) -> np.ndarray:
    """A boolean ellipsoid structuring element with the given radius (voxels) per axis."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius)) <= 1.0


# Water-density attenuation (HU) of a cyst, blurred by noise and resampling; fat and parenchyma lie outside.
FLUID_HU: tuple[float, float] = (-25.0, 35.0)


def fill_fluid_notches(
    labels: np.ndarray,
    hu: np.ndarray,
    values: Sequence[int],
    radius_vox: tuple[int, int, int],
    hu_range: tuple[float, float] = FLUID_HU,
) -> int:
    """Give each organ in ``values`` the fluid-density background in its surface notches (in place).

    A cyst at an organ's surface that the network leaves out is a notch open to the outside,
    which ``fill_enclosed_background`` cannot recover. A closing of the organ's mask with an
    ellipsoid of ``radius_vox`` (array axes) spans such notches; of what the closing adds, only
    background voxels whose attenuation ``hu`` (same grid) lies in ``hu_range`` join the organ,
    so the fat and the other organs around it stay out. Returns how many voxels changed.
    """
    from scipy import ndimage

    radius = tuple(int(r) for r in radius_vox)
    structure = _ellipsoid(radius)
    lo, hi = hu_range
    changed = 0
    boxes = ndimage.find_objects(labels)  # one pass for every organ: boxes[value - 1]
    for value in values:
        if value > len(boxes) or boxes[value - 1] is None:
            continue
        # the organ's box grown by the radius, so the closing sees the notch's surroundings
        box = tuple(slice(max(b.start - r, 0), min(b.stop + r, n))
                    for b, r, n in zip(boxes[value - 1], radius, labels.shape))
        sub = labels[box]
        organ = np.pad(sub == value, [(r, r) for r in radius])  # padding: closing is exact at the edges
        closed = ndimage.binary_closing(organ, structure=structure)[tuple(slice(r, -r or None) for r in radius)]
        h = hu[box]
        add = closed & (sub == 0) & (h >= lo) & (h <= hi)
        count = int(add.sum())
        if count:
            sub[add] = value
            changed += count
    return changed
