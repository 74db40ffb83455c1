"""Writing a segmentation network as a MONAI bundle that ``MonaiBundleSegmenter`` (and MONAI) can load."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path


def _hu_channels(hu_ranges: Sequence[tuple[float, float]]) -> list[dict]:
    """Transforms giving one input channel per HU window (each clipped and scaled to 0..1)."""
    keys = ["@image_key"] + [f"image_{i}" for i in range(1, len(hu_ranges))]
    out: list[dict] = []
    if len(hu_ranges) > 1:
        out.append({"_target_": "CopyItemsd", "keys": "@image_key", "times": len(hu_ranges) - 1,
                    "names": keys[1:]})
    for key, (lo, hi) in zip(keys, hu_ranges):
        out.append({"_target_": "ScaleIntensityRanged", "keys": key, "a_min": float(lo), "a_max": float(hi),
                    "b_min": 0.0, "b_max": 1.0, "clip": True})
    if len(hu_ranges) > 1:
        out.append({"_target_": "ConcatItemsd", "keys": keys, "name": "@image_key"})
    return out


def inference_config(
    network_def: Mapping,
    *,
    spacing: Sequence[float],
    hu_range: tuple[float, float] = (-1000.0, 1000.0),
    roi_size: Sequence[int] | None = None,
    hu_ranges: Sequence[tuple[float, float]] | None = None,
) -> dict:
    """The ``configs/inference.json`` of a CT segmentation bundle: RAS, fixed spacing, clipped HU.

    ``hu_ranges`` (several windows) gives one input channel per window instead of ``hu_range``.
    """
    inferer = (
        {"_target_": "SlidingWindowInferer", "roi_size": list(roi_size), "sw_batch_size": 1, "overlap": 0.25,
         "mode": "gaussian", "padding_mode": "replicate"}
        if roi_size
        else {"_target_": "SimpleInferer"}
    )
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": dict(network_def),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [float(s) for s in spacing],
                 "mode": "bilinear"},
                *_hu_channels(list(hu_ranges) if hu_ranges else [hu_range]),
                {"_target_": "EnsureTyped", "keys": "@image_key", "dtype": "$torch.float32"},
            ],
        },
        "inferer": inferer,
    }


def write_bundle(
    bundle_dir: Path | str,
    *,
    network_def: Mapping,
    state_dict: Mapping,
    channel_def: Mapping[int, str],
    spacing: Sequence[float],
    hu_range: tuple[float, float] = (-1000.0, 1000.0),
    roi_size: Sequence[int] | None = None,
    hu_ranges: Sequence[tuple[float, float]] | None = None,
    name: str = "segmentation",
    version: str = "0.1.0",
    description: str = "",
    intended_use: str = "Demonstration only; not for clinical use.",
    extra_metadata: Mapping | None = None,
) -> Path:
    """Write configs/inference.json, configs/metadata.json and models/model.pt; returns the directory."""
    import monai
    import torch

    bundle_dir = Path(bundle_dir)
    (bundle_dir / "configs").mkdir(parents=True, exist_ok=True)
    (bundle_dir / "models").mkdir(parents=True, exist_ok=True)
    config = inference_config(network_def, spacing=spacing, hu_range=hu_range, roi_size=roi_size, hu_ranges=hu_ranges)
    n_in = len(hu_ranges) if hu_ranges else 1
    (bundle_dir / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    n = len(channel_def)
    metadata = {
        "version": version,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "name": name,
        "task": "CT organ segmentation",
        "description": description,
        "intended_use": intended_use,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": n_in,
                                 "spatial_shape": list(roi_size) if roi_size else ["*", "*", "*"],
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": bool(roi_size),
                                 "channel_def": {str(i): f"HU {lo:g}..{hi:g}" for i, (lo, hi) in
                                                 enumerate(hu_ranges or [hu_range])}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": n,
                                 "spatial_shape": list(roi_size) if roi_size else ["*", "*", "*"],
                                 "dtype": "float32", "value_range": [0, n - 1], "is_patch_data": bool(roi_size),
                                 "channel_def": {str(k): v for k, v in sorted(channel_def.items())}}},
        },
        **dict(extra_metadata or {}),
    }
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, bundle_dir / "models" / "model.pt")
    return bundle_dir
