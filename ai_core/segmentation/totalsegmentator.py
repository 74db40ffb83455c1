"""Segmentation with TotalSegmentator v2 (task ``total``) through its Python API, local weights only.

TotalSegmentator downloads missing weights by itself; the node never may, so the weights are
checked first and a missing set is an error naming the directory. Its usage statistics are
switched off in its config file before every run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ai_core.catalogue import segmenter_label_groups
from ai_core.geometry import image_from_xyz, ras_affine, resample
from ai_core.result import ModelInfo
from ai_core.components import fill_enclosed_background
from ai_core.segmentation.base import (
    Segmentation,
    SegmentationError,
    Segmenter,
    WeightsMissing,
    map_classes,
)
from ai_core.volume import CTVolume

logger = logging.getLogger(__name__)

# nnU-Net dataset ids of the task "total" models (TotalSegmentator v2 python_api).
TASK_IDS = {"normal": (291, 292, 293, 294, 295), "fast": (297,), "fastest": (298,)}


def weights_dir() -> Path:
    """Where TotalSegmentator looks for its weights (TOTALSEG_WEIGHTS_PATH, else its home dir)."""
    if "TOTALSEG_WEIGHTS_PATH" in os.environ:
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    home = Path(os.environ["TOTALSEG_HOME_DIR"]) if "TOTALSEG_HOME_DIR" in os.environ else (
        (Path("/tmp") if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    )
    return home / "nnunet" / "results"


def missing_weights(mode: str, directory: Path | None = None) -> list[int]:
    """The dataset ids of ``mode`` whose weights folder (DatasetNNN_*) is not in the weights dir."""
    directory = directory or weights_dir()
    return [tid for tid in TASK_IDS[mode] if not any(directory.glob(f"Dataset{tid:03d}_*"))]


def map_totalsegmentator_labels(classes: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """TotalSegmentator v2 ``total`` multilabel values -> catalogue labels and organ -> label."""
    return map_classes(classes, segmenter_label_groups("totalsegmentator_v2"))


class TotalSegmentatorSegmenter(Segmenter):
    """TotalSegmentator v2 (``total`` task) as a segmentation backend."""

    def __init__(self, *, fast: bool = True, fastest: bool = False, device: str = "cpu", threads: int = 1):
        try:
            import totalsegmentator  # noqa: F401
        except ImportError as exc:
            raise SegmentationError(
                "the totalsegmentator backend needs the TotalSegmentator package: "
                "`pip install TotalSegmentator` and place its weights locally (or choose another backend)"
            ) from exc
        self.mode = "fastest" if fastest else ("fast" if fast else "normal")
        missing = missing_weights(self.mode)
        if missing:
            raise WeightsMissing(
                f"TotalSegmentator weights for task total ({self.mode}) are missing in {weights_dir()}: "
                f"no Dataset{missing[0]:03d}_* folder. Copy them there (or set TOTALSEG_WEIGHTS_PATH); "
                "the node never downloads weights"
            )
        self.device = "gpu" if device in ("cuda", "gpu") else device
        self.threads = threads
        try:
            version = metadata.version("TotalSegmentator")
        except metadata.PackageNotFoundError:
            version = "unknown"
        self.info = ModelInfo(
            name="TotalSegmentator",
            version=version,
            spec_hash=hashlib.sha256(f"total {self.mode}".encode()).hexdigest()[:16],
        )

    @staticmethod
    def _telemetry_off() -> None:
        from totalsegmentator.config import set_config_key, setup_totalseg

        setup_totalseg()
        set_config_key("send_usage_stats", False)
        set_config_key("statistics_disclaimer_shown", True)

    def segment(self, volume: CTVolume) -> Segmentation:
        """Organ labels of ``volume`` on its own grid, in catalogue terms."""
        import nibabel as nib
        from totalsegmentator.python_api import totalsegmentator

        self._telemetry_off()
        xyz = sitk.GetArrayViewFromImage(volume.image).transpose(2, 1, 0)
        nifti = nib.Nifti1Image(np.asarray(xyz), ras_affine(volume.image))
        try:
            seg = totalsegmentator(
                nifti, None, ml=True, fast=self.mode == "fast", fastest=self.mode == "fastest", task="total",
                device=self.device, quiet=True, nr_thr_resamp=self.threads, nr_thr_saving=1,
            )
        except SystemExit as exc:  # it exits on some errors instead of raising
            raise SegmentationError(f"TotalSegmentator stopped (exit {exc.code}) on series {volume.series_uid}") from exc
        classes = np.asarray(seg.dataobj).astype(np.uint8)
        labels, organ_labels = map_totalsegmentator_labels(classes)
        fill_enclosed_background(labels)
        image = image_from_xyz(labels, seg.affine)
        if image.GetSize() == volume.image.GetSize() and np.allclose(seg.affine, ras_affine(volume.image), atol=1e-3):
            image.CopyInformation(volume.image)  # same grid: drop float noise of the round trip
        else:
            image = resample(image, volume.image, interpolator=sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)
        return Segmentation(labels=image, organ_labels=organ_labels, model=self.info)
