"""Organ segmentation backends, chosen by name, all answering in catalogue terms.

    make_segmenter("builtin")                          the shipped demo bundle (models/demo_seg)
    make_segmenter("monai_bundle", bundle_dir=...)     any MONAI bundle directory
    make_segmenter("totalsegmentator", fast=True)      TotalSegmentator v2 with local weights
"""

from __future__ import annotations

from pathlib import Path

from ai_core.segmentation.base import (
    CATALOGUE_LABELS,
    Segmentation,
    SegmentationError,
    Segmenter,
    WeightsMissing,
    map_classes,
)

DEMO_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "demo_seg"
BACKENDS = ("builtin", "monai_bundle", "totalsegmentator")


def make_segmenter(backend: str, **options) -> Segmenter:
    """Load the segmentation backend named in the config with its options."""
    if backend == "builtin":
        from ai_core.segmentation.monai_bundle import MonaiBundleSegmenter

        options.setdefault("demo", True)
        return MonaiBundleSegmenter(options.pop("bundle_dir", DEMO_BUNDLE), **options)
    if backend == "monai_bundle":
        from ai_core.segmentation.monai_bundle import MonaiBundleSegmenter

        if "bundle_dir" not in options:
            raise SegmentationError("the monai_bundle backend needs bundle_dir: the path of a MONAI bundle directory")
        return MonaiBundleSegmenter(options.pop("bundle_dir"), **options)
    if backend == "totalsegmentator":
        from ai_core.segmentation.totalsegmentator import TotalSegmentatorSegmenter

        return TotalSegmentatorSegmenter(**options)
    raise SegmentationError(f"unknown segmentation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "CATALOGUE_LABELS",
    "DEMO_BUNDLE",
    "Segmentation",
    "SegmentationError",
    "Segmenter",
    "WeightsMissing",
    "make_segmenter",
    "map_classes",
]
