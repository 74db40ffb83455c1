"""Writing a segmentation network as a MONAI bundle that ``MonaiBundleSegmenter`` (and MONAI) can load."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path


def inference_config(
    network_def: Mapping,
    *,
    spacing: Sequence[float],
    hu_range: tuple[float, float] = (-1000.0, 1000.0),
    roi_size: Sequence[int] | None = None,
) -> dict:
    """The ``configs/inference.json`` of a CT segmentation bundle: RAS, fixed spacing, clipped HU."""
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
                {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": float(hu_range[0]),
                 "a_max": float(hu_range[1]), "b_min": 0.0, "b_max": 1.0, "clip": True},
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
    config = inference_config(network_def, spacing=spacing, hu_range=hu_range, roi_size=roi_size)
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
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(roi_size) if roi_size else ["*", "*", "*"],
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": bool(roi_size),
                                 "channel_def": {"0": "image"}}},
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
