"""Largest connected component per organ: removes the stray fragments a segmentation network leaves.

A fragment far from its organ inflates the organ's bounding box (so its window), lowers its Dice,
and, when it lies on a face of the volume, makes the organ "touch the edge of the field of view"
so it is not evaluated at all. Every catalogue organ is one connected structure, so only the
largest component of each class is kept.

Connected components of a 78-million-voxel source grid take seconds; on a network's coarse grid
(about a million voxels) a fraction of a second. So ``LargestComponentSegmenter`` cleans the
classes of a MONAI bundle backend on its own grid, before they are mapped to the catalogue and
brought back to the source grid (the same steps as ``MonaiBundleSegmenter.segment``, with the
cleaning between the mapping to catalogue organs and the resampling).
"""

from __future__ import annotations

import logging

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


class LargestComponentSegmenter:
    """A MONAI bundle segmenter whose classes are cleaned (largest component) on the network grid.

    Delegates everything else (``info``, ``organ_labels``, ``network``, ``input``...) to the wrapped
    ``MonaiBundleSegmenter``.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name == "inner":
            object.__setattr__(self, name, value)
        else:  # e.g. the pipeline's timing wrapper of ``input`` belongs on the wrapped segmenter
            setattr(self.inner, name, value)

    def segment(self, volume):
        """Organ labels of ``volume`` on its own grid, fragments removed."""
        from ai_core.geometry import resample_nearest
        from ai_core.segmentation.base import Segmentation, SegmentationError

        inner = self.inner
        try:
            coarse = inner.predict_classes(volume)
        except Exception as exc:
            raise SegmentationError(f"segmenting series {volume.series_uid} with {inner.info.label}: {exc}") from exc
        arr = sitk.GetArrayViewFromImage(coarse)
        lut = inner.lut if inner.lut.size > int(arr.max()) else np.pad(inner.lut, (0, int(arr.max()) + 1 - inner.lut.size))
        # Catalogue organs first (lobes join their lung, chambers their heart), then components.
        mapped = sitk.GetImageFromArray(keep_largest_components(lut[arr]))
        mapped.CopyInformation(coarse)
        labels = resample_nearest(mapped, volume.image)
        return Segmentation(labels=labels, organ_labels=dict(inner.organ_labels), model=inner.info)
