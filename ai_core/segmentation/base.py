"""The segmentation backend interface and the mapping of a backend's classes to the catalogue.

    SegmentationError        a backend could not be loaded or run; the message names the fix
    └── WeightsMissing       the backend's local weights are not where they should be
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ai_core.catalogue import ORGANS
from ai_core.result import ModelInfo
from ai_core.volume import CTVolume

# Label value of each organ in every Segmentation, whatever the backend: its catalogue position.
CATALOGUE_LABELS: dict[str, int] = {key: i + 1 for i, key in enumerate(ORGANS)}


class SegmentationError(Exception):
    """A segmentation backend could not be loaded or run."""


class WeightsMissing(SegmentationError):
    """The local weights of a backend are missing; the message names the directory."""


@dataclass
class Segmentation:
    """Organ labels on the volume's grid, in catalogue terms."""

    labels: sitk.Image  # uint8, same grid as CTVolume.image; 0 = background
    organ_labels: dict[str, int]  # organs this backend segments -> their value in ``labels``
    model: ModelInfo

    def array(self) -> np.ndarray:
        """The (slices, rows, columns) label array in source order (a copy)."""
        return sitk.GetArrayFromImage(self.labels)


class Segmenter(abc.ABC):
    """A segmentation backend: loaded once, then ``segment`` per volume."""

    info: ModelInfo

    @abc.abstractmethod
    def segment(self, volume: CTVolume) -> Segmentation:
        """Organ labels of ``volume`` on its own grid."""


def catalogue_lut(groups: dict[str, tuple[int, ...]], n_classes: int | None = None) -> np.ndarray:
    """A lookup table from backend class value to catalogue label value (uint8, 0 elsewhere)."""
    top = max([v for vs in groups.values() for v in vs] + [(n_classes or 1) - 1, 0])
    lut = np.zeros(top + 1, dtype=np.uint8)
    for key, values in groups.items():
        if key not in CATALOGUE_LABELS:
            raise ValueError(f"unknown organ {key!r} in a label map; known: {', '.join(CATALOGUE_LABELS)}")
        for v in values:
            if lut[v] and lut[v] != CATALOGUE_LABELS[key]:
                raise ValueError(f"class {v} is mapped to two organs")
            lut[v] = CATALOGUE_LABELS[key]
    return lut


def map_classes(classes: np.ndarray, groups: dict[str, tuple[int, ...]]) -> tuple[np.ndarray, dict[str, int]]:
    """Backend class values -> catalogue labels (uint8) and the organ -> label dict of mapped organs.

    Classes that belong to no catalogue organ become background.
    """
    if classes.size and int(classes.min()) < 0:
        raise ValueError("class values must be non-negative")
    top = int(classes.max()) if classes.size else 0
    lut = catalogue_lut(groups, top + 1)
    return lut[classes], {k: CATALOGUE_LABELS[k] for k in ORGANS if k in groups}
