"""The analysis of one CT series, end to end: the one entry point of the node's workers and the CLI.

    pipeline = Pipeline(PipelineSettings(segmentation="builtin", model="demo", device="auto"))
    result = pipeline.analyze(files, progress=True)          # -> AnalysisResult

Stages (each timed in ``result.timings``, seconds):

    read        series files -> oriented HU volume (``ai_core.volume``); a refusal ends here
    resample    the segmenter's input resampling to its network grid (when it exposes it)
    segment     organ masks on the source grid (``ai_core.segmentation``); ``segment_network``
                is the network's own share
    organs      per-organ voxel counts, volumes and centroids on the source grid
    crop        per-organ windows on the model grid, field-of-view refusals (``ai_core.crops``)
    encode      VLP image network and organ pooling (``ai_core.vlp``)
    score       zero-shot probabilities and calibrated decisions (``ai_core.zeroshot``)

Every organ and every finding of the model ends as ``present``, ``absent`` or ``not evaluated``
with a reason: findings never disappear, not even when the whole series is refused.

Errors:

    PipelineError        the settings cannot be used (unknown backend, missing model files...)
    StageError           a stage failed on this series; the message names the stage
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ai_core.result import AnalysisResult, FindingResult, ModelInfo, OrganResult

# Models load from local files only; nothing is ever downloaded at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEMO_VLP_DIR = MODELS_DIR / "demo_vlp"
DEMO_SEG_DIR = MODELS_DIR / "demo_seg"
STAGES = ("read", "resample", "segment", "organs", "crop", "encode", "score")


class PipelineError(ValueError):
    """The pipeline settings cannot be used; the message names the setting and the fix."""


class StageError(RuntimeError):
    """A stage failed on one series; ``stage`` names it and the message says on what."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class PipelineSettings:
    """What a pipeline runs: the fields of ``pipelines.NAME`` in config.yaml."""

    segmentation: str = "builtin"  # builtin | monai_bundle | totalsegmentator
    segmentation_path: str | None = None  # bundle directory (monai_bundle; optional for builtin)
    segmentation_fast: bool = True  # TotalSegmentator fast mode
    model: str = "demo"  # "demo" or a checkpoint path (own format or fVLM reference)
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    extra_findings: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PipelineSettings:
        """From a mapping such as ``dicom_node.config.Pipeline.model_dump()`` (unknown keys are errors)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise PipelineError(f"unknown pipeline setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("device is 'cuda' but torch sees no GPU; set device to 'auto' or 'cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PipelineError(f"device {device!r} is not allowed; use cpu, cuda or auto")
    return device


def findings_config(extra: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Config ``extra_findings`` (organ -> finding -> [negative, positive] or a mapping) for ``extend_findings``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for organ, entries in (extra or {}).items():
        for key, value in (entries or {}).items():
            if isinstance(value, Mapping):
                out.setdefault(organ, {})[key] = dict(value)
            elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
                out.setdefault(organ, {})[key] = {"negative": str(value[0]), "positive": str(value[1])}
            else:
                raise PipelineError(
                    f"extra_findings.{organ}.{key} must be [negative prompt, positive prompt], got {value!r}"
                )
    return out


def demo_vlp_checkpoint() -> Path:
    """The shipped demo VLP checkpoint (``models/demo_vlp/model.pt``, or the one .pt file there)."""
    path = DEMO_VLP_DIR / "model.pt"
    if path.is_file():
        return path
    found = sorted(DEMO_VLP_DIR.glob("*.pt")) if DEMO_VLP_DIR.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise PipelineError(
        f"the demo VLP model is not installed: no model.pt in {DEMO_VLP_DIR}; train it with "
        "`dicom-node train vlp` or set the pipeline's model to a checkpoint path"
    )


def load_vlp_model(model: str, device: str, extra_findings: Mapping[str, Any] | None = None):
    """The VLP model a setting names ("demo" or a checkpoint path), findings extended from config."""
    from ai_core.vlp.checkpoint import CheckpointError, load_checkpoint, load_fvlm_checkpoint, read_checkpoint
    from ai_core.vlp.spec import ModelSpec
    from ai_core.zeroshot import extend_findings

    path = demo_vlp_checkpoint() if model == "demo" else Path(model).expanduser()
    if not path.is_file():
        raise PipelineError(f"the VLP model {model!r} does not exist; set the pipeline's model to 'demo' or "
                            "to a checkpoint file")
    extra = findings_config(extra_findings or {})
    try:
        try:
            payload = read_checkpoint(path)
        except CheckpointError:
            # Not our format: perhaps a checkpoint of the fVLM reference implementation.
            vlp, report = load_fvlm_checkpoint(path)
            if extra:
                vlp.spec = extend_findings(vlp.spec, extra)
            return vlp.to(device).eval()
        spec = ModelSpec.model_validate(payload["spec"])
        del payload
        spec = extend_findings(spec, extra) if extra else None
        vlp, _ = load_checkpoint(path, device=device, spec_override=spec)
        return vlp
    except CheckpointError as exc:
        raise PipelineError(f"cannot load the VLP model {path}: {exc}") from exc
    except ValueError as exc:  # extend_findings names the bad config entry
        raise PipelineError(f"pipeline extra_findings: {exc}") from exc


def make_pipeline_segmenter(settings: PipelineSettings, device: str):
    """The segmentation backend of the settings, loaded once."""
    from ai_core.segmentation import BACKENDS, SegmentationError, make_segmenter

    backend = settings.segmentation
    if backend not in BACKENDS:
        raise PipelineError(f"segmentation backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    options: dict[str, Any] = {}
    if backend == "totalsegmentator":
        options.update(fast=settings.segmentation_fast, device=device)
    else:
        options["device"] = device
        if settings.segmentation_path:
            options["bundle_dir"] = Path(settings.segmentation_path).expanduser()
        elif backend == "monai_bundle":
            raise PipelineError("segmentation monai_bundle needs segmentation_path: a MONAI bundle directory")
    try:
        segmenter = make_segmenter(backend, **options)
    except SegmentationError as exc:
        raise PipelineError(f"cannot load the {backend} segmenter: {exc}") from exc
    return segmenter


# -- timing ------------------------------------------------------------------------------------


class _Timer:
    """Seconds per stage, and the stage an error happened in."""

    def __init__(self, timings: dict[str, float], bar=None):
        self.timings = timings
        self.bar = bar

    @contextmanager
    def stage(self, name: str, doing: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_description(f"{name:<8}")
        t0 = time.perf_counter()
        try:
            yield
        except StageError:
            raise
        except Exception as exc:
            raise StageError(name, f"{doing}: {type(exc).__name__}: {exc}") from exc
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
            if self.bar is not None:
                self.bar.update(1)


class _NetworkClock:
    """Seconds spent inside a torch module's forward (hooks), to tell network time from the rest."""

    def __init__(self, module) -> None:
        self.seconds = 0.0
        self._t0: float | None = None
        self._handles = []
        if module is not None and hasattr(module, "register_forward_pre_hook"):
            self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None


class _TimedCall:
    """Wraps a callable attribute (a segmenter's input preparation) to add up its seconds."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):  # e.g. BundleInput.grid, .spacing
        return getattr(self.fn, name)


# -- the pipeline ------------------------------------------------------------------------------


@dataclass
class OrganStats:
    """Voxels, volume and centroid of one label on the source grid."""

    voxels: int
    volume_ml: float
    centroid_lps: tuple[float, float, float]
    touches_edge: bool  # its bounding box reaches a face of the volume: it may be cut off


def organ_stats(labels: sitk.Image, stride: int | None = None) -> dict[int, OrganStats]:
    """Per label value: exact voxel count and volume (mL), centroid (LPS mm), whether it reaches an edge.

    Counts are exact (one ``torch.bincount`` pass); centroids come from the per-axis marginals of
    every ``stride``-th voxel along each axis (default: about 2 million voxels in all), within a
    couple of voxels of the exact centroid, at a cost that does not depend on the shapes (ITK's
    shape statistics are fast on smooth maps but take tens of seconds on a fragmented one).
    """
    import warnings

    import torch

    arr = sitk.GetArrayViewFromImage(labels)  # (z, y, x), valid while ``labels`` lives
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    with warnings.catch_warnings():  # read-only view: bincount only reads it
        warnings.simplefilter("ignore", UserWarning)
        counts = torch.bincount(torch.from_numpy(arr).reshape(-1), minlength=256).numpy()
    values = [int(v) for v in np.flatnonzero(counts[1:]) + 1]
    if not values:
        return {}
    faces = (arr[0], arr[-1], arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1])
    on_edge = set().union(*(np.unique(f).tolist() for f in faces))

    if stride is None:
        stride = max(1, math.ceil((arr.size / 2e6) ** (1 / 3)))
    sub = np.ascontiguousarray(arr[::stride, ::stride, ::stride])
    sums = np.zeros((256, 3))
    weight = np.zeros(256)
    for axis in range(3):
        n = sub.shape[axis]
        shape = [1, 1, 1]
        shape[axis] = n
        index = sub.astype(np.int32) + (np.arange(n, dtype=np.int32) * 256).reshape(shape)
        marginal = torch.bincount(torch.from_numpy(index).reshape(-1), minlength=n * 256).numpy().reshape(n, 256)
        del index
        sums[:, axis] = (marginal * (np.arange(n) * stride)[:, None]).sum(0)
        weight = marginal.sum(0)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    out = {}
    for v in values:
        if weight[v] > 0:
            zyx = sums[v] / weight[v]
        else:  # smaller than the stride: look at full resolution
            zyx = np.argwhere(arr == v).mean(0)
        centroid = labels.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in zyx[::-1]))
        n = int(counts[v])
        out[v] = OrganStats(n, round(n * voxel_ml, 2), tuple(round(float(c), 2) for c in centroid), v in on_edge)
    return out


class Pipeline:
    """Models loaded once; ``analyze`` per series. Keep one per worker process and reuse it."""

    def __init__(self, settings: PipelineSettings | None = None, *, segmenter=None, model=None,
                 warm_up: bool = True):
        """Load the segmenter and the VLP model of ``settings`` (or use the given, already loaded ones)."""
        from ai_core.crops import CropConfig
        from ai_core.zeroshot import ZeroShotScorer

        self.settings = settings or PipelineSettings()
        needs_device = segmenter is None or model is None
        self.device = resolve_device(self.settings.device) if needs_device else "cpu"
        t0 = time.perf_counter()
        self.segmenter = segmenter if segmenter is not None else make_pipeline_segmenter(self.settings, self.device)
        if model is None:
            model = load_vlp_model(self.settings.model, self.device, self.settings.extra_findings)
        self.model = model.eval()
        self.device = str(next(self.model.parameters()).device)
        self.spec = self.model.spec
        self.scorer = ZeroShotScorer(self.model)
        self.crop_config = CropConfig.from_preprocess(self.spec.preprocess, patch=tuple(self.spec.vision.patch))
        # Text embeddings of the prompts are computed once, now, not on the first series.
        for organ in self.spec.findings:
            self.scorer.text_embeddings(organ)
        self._seg_net = _NetworkClock(getattr(self.segmenter, "network", None))
        self._vlp_seconds = 0.0  # inside the VLP model's image side (encoder, pooling, projection)
        if callable(getattr(self.segmenter, "input", None)):
            self.segmenter.input = _TimedCall(self.segmenter.input)
        if warm_up:
            self.warm_up()
        logger.info("pipeline loaded in %.1f s: segmenter %s, VLP model %s on %s", time.perf_counter() - t0,
                    self.segmenter.info.label, self.model_info.label, self.device)

    # -- identities and the organs/findings every result lists --

    @property
    def model_info(self) -> ModelInfo:
        """Name, version and spec hash of the VLP model."""
        return self.scorer.model_info

    @property
    def segmenter_info(self) -> ModelInfo:
        """Name, version and hash of the segmenter."""
        return self.segmenter.info

    def members(self, organ: str) -> tuple[str, ...]:
        """Catalogue organs that make up one organ of the model (a group such as fVLM 'lung', or itself)."""
        return tuple(self.spec.organ_groups.get(organ, (organ,)))

    def reported_organs(self, organ_labels: Mapping[str, int] | None = None) -> list[str]:
        """Catalogue organs a result lists: the segmenter's and the model's, in catalogue order."""
        from ai_core.catalogue import ORGANS

        wanted = set(organ_labels if organ_labels is not None else getattr(self.segmenter, "organ_labels", {}))
        for organ in self.spec.organs:
            wanted.update(m for m in self.members(organ) if m in ORGANS)
        return [k for k in ORGANS if k in wanted]

    def _finding_rows(self, decisions: Mapping[str, list[FindingResult]]) -> list[FindingResult]:
        """Findings per catalogue organ: a group's findings are reported for each of its members."""
        rows: list[FindingResult] = []
        for organ in self.spec.findings:
            for member in self.members(organ):
                for f in decisions.get(organ, []):
                    rows.append(f if member == organ else FindingResult(
                        member, f.finding, f.decision, f.probability, f.threshold, f.reason, f.point_lps))
        return rows

    def refused_result(self, reason: str, study_uid: str = "", series_uid: str = "",
                       files: Sequence[Path] = (), timings: dict[str, float] | None = None) -> AnalysisResult:
        """A result for a series that cannot be analysed: every organ and finding not evaluated, with why."""
        why = f"series not analysed: {reason}"
        organs = [OrganResult(o, 0, "not evaluated", why) for o in self.reported_organs()]
        decisions = {o: self.scorer.score_organ(o, None, why) for o in self.spec.findings}
        return AnalysisResult(
            study_instance_uid=study_uid, series_instance_uid=series_uid, model=self.model_info,
            segmenter=self.segmenter_info, organs=organs, findings=self._finding_rows(decisions),
            source_files=list(files), labels=None, refused=reason, timings=dict(timings or {}),
        )

    # -- analysis --

    def analyze(self, files: Path | str | Iterable[Path | str], progress: bool = False) -> AnalysisResult:
        """Analyse one CT series (files or a folder); a series that cannot be read safely is refused."""
        from ai_core.volume import VolumeRefused, read_volume

        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(p) for p in files]
        timings: dict[str, float] = {}
        bar = _progress_bar(progress)
        timer = _Timer(timings, bar)
        t0 = time.perf_counter()
        try:
            try:
                with timer.stage("read", f"reading the series ({len(paths)} path(s))"):
                    volume = read_volume(paths)
            except StageError as exc:
                if not isinstance(exc.__cause__, VolumeRefused):
                    raise
                reason = exc.__cause__.reason
                logger.warning("series refused: %s", reason)
                files = [f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file())
                                                     if p.is_dir() else [p])]
                study, series = _uids_of(files)
                timings["total"] = time.perf_counter() - t0
                return self.refused_result(reason, study, series, files, timings=timings)
            return self._analyze_volume(volume, timer, t0)
        finally:
            if bar is not None:
                bar.close()

    def analyze_volume(self, volume, progress: bool = False) -> AnalysisResult:
        """Analyse a volume already in memory (``ai_core.volume.CTVolume``), e.g. a phantom."""
        timings: dict[str, float] = {"read": 0.0}
        bar = _progress_bar(progress, skip=1)
        try:
            return self._analyze_volume(volume, _Timer(timings, bar), time.perf_counter())
        finally:
            if bar is not None:
                bar.close()

    def _analyze_volume(self, volume, timer: _Timer, t0: float) -> AnalysisResult:
        from ai_core.crops import crop_organs

        timings = timer.timings
        series = volume.series_uid
        seg_net0, vlp_net0 = self._seg_net.seconds, self._vlp_seconds
        prep = self.segmenter.input if isinstance(getattr(self.segmenter, "input", None), _TimedCall) else None
        prep0 = prep.seconds if prep is not None else 0.0

        with timer.stage("segment", f"segmenting series {series} with {self.segmenter_info.label}"):
            segmentation = self.segmenter.segment(volume)
            if segmentation.labels.GetSize() != volume.image.GetSize():
                raise ValueError(f"the segmenter returned labels of size {segmentation.labels.GetSize()}, "
                                 f"the volume is {volume.image.GetSize()}")
        # The segmenter's resampling to its network grid is its own stage in the table.
        timings["resample"] = (prep.seconds - prep0) if prep is not None else 0.0
        timings["segment"] -= timings["resample"]
        timings["segment_network"] = self._seg_net.seconds - seg_net0
        if timer.bar is not None:
            timer.bar.update(1)

        organ_labels = dict(segmentation.organ_labels)
        with timer.stage("organs", f"measuring the organs of series {series}"):
            stats = organ_stats(segmentation.labels)
            labels = sitk.GetArrayFromImage(segmentation.labels)  # (slices, rows, columns) = source order
            if labels.dtype != np.uint8:
                labels = labels.astype(np.uint8)

        # Windows for the model's organs (crop_organs refuses those cut off by the field of view).
        reported = self.reported_organs(organ_labels)
        groups = {o: self.members(o) for o in self.spec.organs if o in self.spec.organ_groups}
        with timer.stage("crop", f"cropping the organs of series {series}"):
            crops = crop_organs(volume, segmentation.labels, organ_labels, self.crop_config,
                                organs=list(self.spec.organs), groups=groups)
        reasons: dict[str, str] = dict(crops.not_evaluated)
        for organ in self.spec.organs:
            if organ not in crops.crops and organ not in reasons:
                reasons[organ] = "organ not found in the field of view"

        embeddings: dict[str, Any] = {}
        with timer.stage("encode", f"encoding the organ windows of series {series} with {self.model_info.label}"):
            todo = [o for o in self.spec.organs if o in crops.crops]
            embeddings = self._encode(crops, todo, timer.bar)
        timings["encode_network"] = self._vlp_seconds - vlp_net0

        with timer.stage("score", f"scoring the findings of series {series}"):
            points = {o: _group_point(stats, organ_labels, self.members(o)) for o in self.spec.organs}
            decisions = {
                o: self.scorer.score_organ(o, embeddings.get(o), reasons.get(o), points.get(o))
                for o in self.spec.findings
            }
            organ_rows = [self._organ_row(key, organ_labels, stats, crops, reasons) for key in reported]
        timings["total"] = time.perf_counter() - t0
        return AnalysisResult(
            study_instance_uid=volume.study_uid,
            series_instance_uid=volume.series_uid,
            model=self.model_info,
            segmenter=segmentation.model,
            organs=organ_rows,
            findings=self._finding_rows(decisions),
            source_files=list(volume.files),
            labels=labels,
            source_headers=getattr(volume, "headers", None),
            refused=None,
            timings=timings,
        )

    def _organ_row(self, key: str, organ_labels: Mapping[str, int], stats: Mapping[int, OrganStats], crops,
                   reasons: Mapping[str, str]) -> OrganResult:
        """One organ's status: segmented, inside the field of view, and cropped when the model reads it."""
        value = organ_labels.get(key, 0)
        st = stats.get(value) if value else None
        if not value:
            return OrganResult(key, 0, "not evaluated", f"not segmented by {self.segmenter_info.label}")
        if st is None:
            return OrganResult(key, 0, "not evaluated", "organ not found in the field of view")
        group = next((o for o in self.spec.organs if key in self.members(o)), None)
        if group is not None:
            why = None if group in crops.crops else reasons.get(group, "organ not evaluated")
        else:  # an organ the model does not read: only the field-of-view check applies
            why = "organ touches the edge of the field of view (it may be cut off)" if st.touches_edge else None
        return OrganResult(key, value, "not evaluated" if why else "evaluated", why, st.volume_ml)

    def _encode(self, crops, organs: Sequence[str], bar=None) -> dict[str, Any]:
        """Organ embeddings; windows of one shape go through the image network together."""
        import torch

        groups: dict[tuple[int, ...], list[str]] = {}
        for organ in organs:
            groups.setdefault(tuple(crops.crops[organ].image.shape), []).append(organ)
        out: dict[str, Any] = {}
        inner = None
        if bar is not None:
            from tqdm import tqdm

            inner = tqdm(total=len(organs), desc="  organ windows", unit="organ", leave=False)
        with torch.inference_mode():
            for names in groups.values():
                image = torch.from_numpy(np.stack([crops.crops[o].image for o in names])).to(self.device)
                masks = []
                for organ in names:
                    crop = crops.crops[organ]
                    members = [crop.masks[m] for m in self.members(organ) if m in crop.masks]
                    masks.append(members[0] if len(members) == 1 else np.logical_or.reduce(members))
                mask_t = torch.from_numpy(np.stack(masks)).to(self.device)
                t0 = time.perf_counter()
                # A model whose encoder also sees the organ's mask (vision.mask_channel) gets it.
                levels = self.model.image_levels(image, mask_t if self.spec.vision.mask_channel else None)
                for b, organ in enumerate(names):
                    index = self.spec.organ_index(organ)
                    pooled = self.model.pool_organ(levels, b, index, mask_t[b])
                    out[organ] = self.model.project_image(pooled, index).float().cpu()
                self._vlp_seconds += time.perf_counter() - t0
                del levels, image
                if inner is not None:
                    inner.update(len(names))
        if inner is not None:
            inner.close()
        return out

    def warm_up(self) -> None:
        """One pass of the image side on an empty window, so the first series does not pay for it."""
        import torch

        from ai_core.crops import padded_shape

        shape = padded_shape(self.crop_config.window, self.crop_config.patch)
        with torch.inference_mode():
            image = torch.zeros((1, 1, *shape), device=self.device)
            mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
            mask[tuple(slice(0, max(1, n // 4)) for n in shape)] = True
            levels = self.model.image_levels(image, mask[None] if self.spec.vision.mask_channel else None)
            self.model.project_image(self.model.pool_organ(levels, 0, 0, mask), 0)


def _group_point(stats: Mapping[int, OrganStats], organ_labels: Mapping[str, int],
                 members: Sequence[str]) -> tuple[float, float, float] | None:
    """The voxel-weighted centroid (LPS mm) of an organ or group, if segmented."""
    parts = [stats[organ_labels[m]] for m in members if m in organ_labels and organ_labels[m] in stats]
    total = sum(p.voxels for p in parts)
    if not total:
        return None
    c = sum(np.asarray(p.centroid_lps) * p.voxels for p in parts) / total
    return tuple(round(float(v), 2) for v in c)


def _uids_of(files: Sequence[Path]) -> tuple[str, str]:
    """Study and series UID of the first readable DICOM file (of the first 20), for a refused series' result."""
    import pydicom

    for f in files[:20]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - any unreadable file: try the next
            continue
        if "SeriesInstanceUID" in ds:
            return str(ds.get("StudyInstanceUID", "")), str(ds.SeriesInstanceUID)
    return "", ""


def _progress_bar(enabled: bool, skip: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=len(STAGES), desc="analyze", unit="stage", leave=True)
    bar.update(skip)
    return bar
