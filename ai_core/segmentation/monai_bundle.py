"""Segmentation with any MONAI bundle directory (configs/inference.json, configs/metadata.json, models/).

The bundle's own ``network_def``, ``preprocessing`` and ``inferer`` are used; its file loader and
post-processing are not, since the volume is already in memory and the result goes back onto the
source grid. To keep CPU inference fast, the volume is first resampled (SimpleITK, float32) to the
spacing of the bundle's ``Spacingd`` (or ``spacing`` given here), so the bundle's own transforms
run on a small image; the predicted classes go back to the source grid by nearest neighbour,
through the affine MONAI carries, so no inverse transform is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ai_core.catalogue import label_groups_from_names
from ai_core.components import FLUID_HU, fill_enclosed_background, fill_fluid_notches, keep_largest_components
from ai_core.geometry import image_from_xyz, ras_affine, resample, resample_nearest, resampled_grid
from ai_core.result import ModelInfo
from ai_core.segmentation.base import (
    Segmentation,
    SegmentationError,
    Segmenter,
    WeightsMissing,
    catalogue_lut,
)
from ai_core.volume import CTVolume

logger = logging.getLogger(__name__)

def _quiet_monai() -> None:
    """Silence two MONAI messages that alarm an administrator and concern nothing this code uses.

    nvImageCodec (a GPU JPEG decoder for pydicom) is optional and unused: pixel data is decoded
    by pydicom/SimpleITK before MONAI sees it. ``Orientationd``'s ``labels`` default is changing,
    but the bundle's reorientation is done by SimpleITK (see ``BundleInput``), not by MONAI.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*Orientationd\.__init__:labels", category=FutureWarning)


# Transforms of a bundle's preprocessing that read files or add the channel: done here instead.
_SKIPPED_TRANSFORMS = {"LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "AddChanneld"}


def bundle_channel_names(metadata: Mapping) -> dict[int, str]:
    """Output class value -> name, from ``network_data_format.outputs.pred.channel_def``."""
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError):
        return {}
    return {int(k): str(v) for k, v in channel_def.items()}


class BundleInput:
    """A bundle's preprocessing applied to an in-memory SimpleITK CT image (shared with training).

    File loading and channel handling are skipped; reorientation is done by SimpleITK; the image
    is first resampled to the network spacing so the bundle's own transforms run on a small image.
    """

    def __init__(self, parser, spacing: Sequence[float] | None = None):
        transforms = []
        if "preprocessing" in parser:
            pre = parser.get_parsed_content("preprocessing", instantiate=True)
            transforms = [t for t in getattr(pre, "transforms", [pre]) if type(t).__name__ not in _SKIPPED_TRANSFORMS]
        # Reorientation is a permutation and flip of axes: SimpleITK's DICOMOrient does it exactly
        # (MONAI's Orientation needs nibabel, which this package does not depend on).
        self.axcodes: str | None = None
        self.transforms: list = []
        for t in transforms:
            if type(t).__name__ in ("Orientationd", "Orientation"):
                inner = getattr(t, "ornt_transform", t)
                if self.axcodes is None and inner.axcodes:
                    self.axcodes = str(inner.axcodes)
                continue
            self.transforms.append(t)
        self.spacing = tuple(float(v) for v in spacing) if spacing else self._bundle_spacing()

    def _bundle_spacing(self) -> tuple[float, float, float] | None:
        for t in self.transforms:
            if type(t).__name__ in ("Spacingd", "Spacing"):
                inner = getattr(t, "spacing_transform", t)
                pixdim = np.atleast_1d(np.asarray(inner.pixdim, dtype=float))
                if pixdim.size == 1:
                    pixdim = np.repeat(pixdim, 3)
                return tuple(float(v) for v in pixdim[:3])
        return None

    def source_axis_spacing(self, image: sitk.Image) -> tuple[float, float, float]:
        """The network spacing per source axis (each source axis takes that of its closest RAS axis)."""
        d = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
        return tuple(float(self.spacing[int(np.argmax(d[:, i]))]) for i in range(3))  # type: ignore[index]

    def __call__(self, image: sitk.Image):
        """The network input: a MetaTensor (1, x, y, z) with its RAS affine."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import apply_transform

        if self.spacing is not None:
            image = resample(image, resampled_grid(image, self.source_axis_spacing(image)),
                             pixel_type=sitk.sitkFloat32, default=-1024.0)
        elif image.GetPixelID() != sitk.sitkFloat32:
            image = sitk.Cast(image, sitk.sitkFloat32)
        if self.axcodes:
            # ITK orientation codes name the direction each axis increases towards, as MONAI's do.
            image = sitk.DICOMOrient(image, self.axcodes)
        xyz = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
        affine = torch.as_tensor(ras_affine(image))
        data = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(xyz))[None], affine=affine)}
        for t in self.transforms:
            data = apply_transform(t, data)
        img = data["image"]
        return img if isinstance(img, MetaTensor) else MetaTensor(img, affine=affine)

    @staticmethod
    def grid(tensor) -> sitk.Image:
        """An empty uint8 image on the grid of a (C, x, y, z) MetaTensor, e.g. to resample labels onto."""
        shape = tuple(int(v) for v in tensor.shape[1:])
        return image_from_xyz(np.zeros(shape, dtype=np.uint8), tensor.affine.cpu().numpy())


class MonaiBundleSegmenter(Segmenter):
    """A MONAI bundle directory as a segmentation backend."""

    def __init__(
        self,
        bundle_dir: Path | str,
        *,
        device: str = "cpu",
        config_file: str = "configs/inference.json",
        weights: Path | str | None = None,
        overrides: Mapping[str, object] | None = None,
        label_map: Mapping[str, Sequence[int]] | None = None,
        spacing: Sequence[float] | None = None,
        demo: bool = False,
    ):
        import torch

        _quiet_monai()
        from monai.bundle import ConfigParser

        self.bundle_dir = Path(bundle_dir).resolve()
        config_path = self.bundle_dir / config_file
        meta_path = self.bundle_dir / "configs" / "metadata.json"
        if not config_path.is_file():
            raise SegmentationError(
                f"{self.bundle_dir} is not a MONAI bundle: {config_file} is missing; point the "
                "segmentation bundle setting at a bundle directory (configs/, models/)"
            )
        self.metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(self.bundle_dir)
        if "device" in parser:
            parser["device"] = f"$torch.device('{self.device}')"
        if parser.get("inferer") is not None and "device" in (parser.get("inferer") or {}):
            parser["inferer#device"] = f"$torch.device('{self.device}')"
        for key, value in (overrides or {}).items():
            parser[key] = value
        try:
            key = "network_def" if "network_def" in parser else "network"
            self.network = parser.get_parsed_content(key, instantiate=True)
            self.input = BundleInput(parser, spacing)
            self.inferer = (
                parser.get_parsed_content("inferer", instantiate=True) if "inferer" in parser else None
            )
        except Exception as exc:
            raise SegmentationError(f"cannot build the network of bundle {self.bundle_dir}: {exc}") from exc

        weights_path = Path(weights) if weights else self._weights_path(parser)
        if not weights_path.is_file():
            raise WeightsMissing(
                f"the weights of bundle {self.bundle_dir.name} are missing: expected {weights_path}; "
                "copy the bundle's model file there (no weights are downloaded at run time)"
            )
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
            state = state["model"]
        elif isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        try:
            self.network.load_state_dict(state)
        except RuntimeError as exc:
            raise SegmentationError(f"the weights {weights_path} do not fit the bundle's network: {exc}") from exc
        self.network.to(self.device).eval()

        if label_map is not None:
            self.groups = {k: tuple(int(v) for v in vs) for k, vs in label_map.items()}
        else:
            self.groups = label_groups_from_names(bundle_channel_names(self.metadata))
        if not self.groups:
            raise SegmentationError(
                f"bundle {self.bundle_dir.name}: no output class maps to a catalogue organ; its "
                "metadata channel_def names none, so give a label_map (organ key -> class values)"
            )
        self.lut = catalogue_lut(self.groups)
        self.organ_labels = {k: int(self.lut[self.groups[k][0]]) for k in self.groups}
        self.fluid_notches = self._fluid_notches(self.metadata)
        self.info = ModelInfo(
            name=str(self.metadata.get("name", self.bundle_dir.name)),
            version=str(self.metadata.get("version", "0")),
            spec_hash=self._hash(config_path, meta_path, weights_path),
            demo=demo,
        )

    def _fluid_notches(self, metadata: Mapping) -> tuple[list[int], float, tuple[float, float]] | None:
        """The bundle's ``cleanup.fluid_notches`` (organs, radius_mm, hu), checked; None when absent."""
        cleanup = metadata.get("cleanup") or {}
        if not isinstance(cleanup, Mapping) or set(cleanup) - {"fluid_notches"}:
            # a misspelt key would otherwise leave the clean-up off without a word
            raise SegmentationError(
                f"bundle {self.bundle_dir.name}: configs/metadata.json cleanup must be a mapping whose only "
                f"key is fluid_notches; found {cleanup!r}"
            )
        spec = cleanup.get("fluid_notches")
        if not spec:
            return None
        where = f"bundle {self.bundle_dir.name}: configs/metadata.json cleanup.fluid_notches"
        try:
            if not isinstance(spec, Mapping):
                raise TypeError(f"found {type(spec).__name__} {spec!r}")
            organs = [str(o) for o in spec["organs"]]
            radius_mm = float(spec["radius_mm"])
            lo, hi = (float(v) for v in spec.get("hu", FLUID_HU))
        except (KeyError, TypeError, ValueError) as exc:
            raise SegmentationError(
                f"{where} must be {{organs: [organ keys], radius_mm: number, hu: [low, high]}}: {exc!r}"
            ) from exc
        unknown = [o for o in organs if o not in self.organ_labels]
        if unknown or radius_mm <= 0 or lo >= hi:
            raise SegmentationError(
                f"{where}: organs must be among the bundle's ({', '.join(sorted(self.organ_labels))}), "
                f"radius_mm > 0 and hu low < high; got unknown organs {unknown}, radius_mm {radius_mm}, "
                f"hu {[lo, hi]}"
            )
        return [self.organ_labels[o] for o in organs], radius_mm, (lo, hi)

    def _weights_path(self, parser) -> Path:
        try:
            if "checkpointloader" in parser and "load_path" in parser["checkpointloader"]:
                return Path(parser.get_parsed_content("checkpointloader#load_path"))
        except Exception:  # an odd loader expression must not hide the default location
            logger.debug("bundle checkpointloader#load_path not usable; using models/model.pt")
        return self.bundle_dir / "models" / "model.pt"

    @staticmethod
    def _hash(*paths: Path) -> str:
        h = hashlib.sha256()
        for p in paths:
            if p.is_file():
                h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def predict_classes(self, volume: CTVolume) -> sitk.Image:
        """The bundle's argmax classes as a uint8 image on the network's (coarse) grid."""
        import torch

        img = self.input(volume.image)
        with torch.inference_mode():
            batch = img.as_tensor()[None].to(self.device)
            logits = self.inferer(batch, self.network) if self.inferer is not None else self.network(batch)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            # numpy's argmax over the channel axis is several times faster than torch's on CPU.
            classes = logits[0].float().cpu().numpy().argmax(0).astype(np.uint8)
        return image_from_xyz(classes, img.affine.cpu().numpy())

    def segment(self, volume: CTVolume) -> Segmentation:
        """Organ labels of ``volume`` on its own grid, in catalogue terms."""
        try:
            coarse = self.predict_classes(volume)
        except Exception as exc:
            raise SegmentationError(f"segmenting series {volume.series_uid} with {self.info.label}: {exc}") from exc
        arr = sitk.GetArrayViewFromImage(coarse)
        lut = self.lut if self.lut.size > int(arr.max()) else np.pad(self.lut, (0, int(arr.max()) + 1 - self.lut.size))
        # Catalogue organs first (lobes join their lung, chambers their heart), then the clean-up,
        # on the network's grid (see ai_core.components), before the resampling to the source's.
        classes = keep_largest_components(lut[arr])
        if self.fluid_notches is not None:
            values, radius_mm, hu_range = self.fluid_notches
            hu = resample(volume.image, coarse, pixel_type=sitk.sitkFloat32, default=-1024.0)
            radius = tuple(max(1, round(radius_mm / s)) for s in reversed(coarse.GetSpacing()))
            fill_fluid_notches(classes, sitk.GetArrayViewFromImage(hu), values, radius, hu_range)
        # after the notches: a notch's non-fluid voxels may be enclosed once its fluid has joined
        fill_enclosed_background(classes)
        mapped = sitk.GetImageFromArray(classes)
        mapped.CopyInformation(coarse)
        labels = resample_nearest(mapped, volume.image)
        return Segmentation(labels=labels, organ_labels=dict(self.organ_labels), model=self.info)
