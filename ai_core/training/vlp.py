"""Organ-level VLP training (fVLM loss with false-negative calibration + CT-GLIP abnormality dictionary).

Data: cases of (HU volume, organ label map, per-organ report sentences), from the phantom generator
or from a directory (``DirectoryCases``). Each organ of a case becomes one window, cut by the same
crop code as inference (``ai_core.crops``) from the ground-truth label map, with a small random
shift of the window centre (inference centres on a predicted mask). With a segmenter
(``TrainConfig.segmenter``) the label map is that segmenter's prediction instead, as fVLM trains on
TotalSegmentator masks: the model then learns, and its thresholds are calibrated, on the masks it
will be given at inference.

Loss per organ, over the windows of that organ in the batch:

- image-text contrastive (fVLM): similarities (image . text) / temp against the organ's report
  text; soft targets from the false-negative calibration: a window's own text, any identical
  text, and, when its text is a "no significant abnormality" one, every other normal text of the
  same organ count as positives, the row normalised to sum 1 (as the fVLM reference).
- abnormality dictionary (CT-GLIP): the organ's dictionary of descriptions (normal phrasings and
  phrasings of each abnormality) as extra contrastive texts; targets uniform over the entries
  that the window's report asserts (its abnormalities, or the normal phrasings).
- prompt pairs: for each finding of the organ, the zero-shot pair (negative, positive) as a
  two-way contrast with the report's label, so training optimises the very softmax that
  zero-shot scoring reads.

A text tower that is frozen (the demo's MiniLM) is run once per distinct text; only the
projections, the vision side and ``temp`` train. After training, per-finding thresholds are
calibrated on a validation split (Youden's J) and stored in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ai_core.evaluation import youden_threshold
from ai_core.vlp.checkpoint import init_from_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from ai_core.vlp.model import OrganVLP, build_model
from ai_core.vlp.spec import MINILM_PACKAGE, FindingSpec, ModelSpec, PoolingSpec, PreprocessSpec, TextSpec, VisionSpec

log = logging.getLogger(__name__)


# -- data --------------------------------------------------------------------------------------


@dataclass
class OrganReport:
    """What a case's report says about one organ."""

    text: str  # the organ's sentences joined, as fVLM pairs an organ with its text
    normal: bool  # only "no significant abnormality" / negated statements
    findings: dict[str, bool]  # finding -> asserted present (True) / absent (False)


@dataclass
class TrainCase:
    """One training case: HU volume and label map (SimpleITK images) and per-organ report."""

    case_id: str
    image: Any  # sitk.Image, HU
    labels: Any  # sitk.Image, uint8
    organ_labels: dict[str, int]
    reports: dict[str, OrganReport]


def _reports_from_sentences(
    sentences: Iterable[tuple[str, str, Mapping[str, bool]]], supported: Mapping[str, Sequence[str]]
) -> dict[str, OrganReport]:
    """Per-organ reports from (organ, text, findings asserted/negated) sentences.

    A finding of ``supported`` that no sentence asserts is absent: phantom reports (and the
    labels of datasets such as CT-RATE) name every abnormality that is there.
    """
    texts: dict[str, list[str]] = {}
    asserted: dict[str, dict[str, bool]] = {}
    for organ, text, findings in sentences:
        texts.setdefault(organ, []).append(text)
        for f, v in findings.items():
            asserted.setdefault(organ, {})[f] = asserted.get(organ, {}).get(f, False) or bool(v)
    out = {}
    for organ, parts in texts.items():
        labels = {f: asserted.get(organ, {}).get(f, False) for f in supported.get(organ, ())}
        out[organ] = OrganReport(" ".join(parts), not any(asserted.get(organ, {}).values()), labels)
    return out


def phantom_cases(seed: int, indices: Iterable[int], spacing: Sequence[float] | None = None) -> Iterator[TrainCase]:
    """Cases ``indices`` of the balanced phantom set ``seed`` (each finding present in some, absent in others)."""
    from ai_core.phantom.findings import FINDINGS
    from ai_core.phantom.generator import TRAINING_SPACING, generate_case

    for i in indices:
        case = generate_case(seed, balanced_index=int(i), spacing=tuple(spacing or TRAINING_SPACING))
        reports = _reports_from_sentences(((s.organ, s.text, s.findings) for s in case.sentences), FINDINGS)
        yield TrainCase(f"phantom-{seed}-{i}", case.image, case.labels, dict(case.organ_labels), reports)


def directory_cases(root: str | Path) -> Iterator[TrainCase]:
    """Cases from ``root/<case>/``: ``image.nii.gz`` (or a DICOM ``series/``), ``labels.nii.gz``, ``truth.json``.

    ``truth.json`` (as ``dicom-node phantom`` writes it) holds ``organs`` ({organ: {label: N}}),
    ``sentences`` ([{organ, text, findings: {finding: true|false}}]) and ``supported_pairs``.
    """
    import SimpleITK as sitk

    root = Path(root)
    dirs = sorted(p for p in root.iterdir() if (p / "truth.json").is_file())
    if not dirs:
        raise FileNotFoundError(f"no case folders with truth.json under {root}")
    for d in dirs:
        truth = json.loads((d / "truth.json").read_text())
        if (d / "image.nii.gz").is_file():
            image = sitk.ReadImage(str(d / "image.nii.gz"))
        else:
            from ai_core.volume import read_series

            image = read_series(d / truth.get("series_dir", "series")).image
        labels = sitk.ReadImage(str(d / truth.get("label_map", "labels.nii.gz")))
        organ_labels = {o: int(v["label"]) for o, v in truth["organs"].items()}
        supported: dict[str, list[str]] = {}
        for o, f in truth.get("supported_pairs", []):
            supported.setdefault(o, []).append(f)
        sentences = ((s["organ"], s["text"], s.get("findings", {})) for s in truth["sentences"])
        yield TrainCase(d.name, image, labels, organ_labels, _reports_from_sentences(sentences, supported))


@dataclass
class Window:
    """One organ window ready for the model: image (1, D, H, W) float16 0..1 and the organ's mask."""

    case_id: str
    organ: str
    image: np.ndarray
    mask_bits: np.ndarray  # np.packbits of the (D, H, W) bool mask
    report: OrganReport

    @property
    def shape(self) -> tuple[int, ...]:
        """(D, H, W) of the window."""
        return tuple(self.image.shape[1:])

    def mask(self) -> np.ndarray:
        """The organ's bool mask (D, H, W)."""
        n = int(np.prod(self.shape))
        return np.unpackbits(self.mask_bits, count=n).reshape(self.shape).astype(bool)


def case_windows(case: TrainCase, spec: ModelSpec, rng: np.random.Generator, jitter: int = 0) -> list[Window]:
    """The windows of a case's organs, cut as inference cuts them, centres shifted by up to ``jitter`` voxels.

    Organs without voxels, or of which less than ``min_inside`` fits in the window, are left out.
    Organs touching the edge of the field of view are kept: their windows still teach the model
    (inference leaves them out because they may be cut off; training knows the truth).
    """
    from ai_core.crops import CropConfig, crop_window, resample_for_crops, window_bounds

    config = CropConfig.from_preprocess(spec.preprocess, patch=tuple(spec.vision.patch))
    scaled, lab, _ = resample_for_crops(case.image, case.labels, config)
    boxes = ndimage.find_objects(lab)
    counts = np.bincount(lab.ravel(), minlength=256)
    out = []
    for organ in spec.organs:
        members = spec.organ_groups.get(organ, (organ,))
        values = [case.organ_labels.get(m) for m in members]
        if organ not in case.reports or None in values:
            continue
        if any(v > len(boxes) or boxes[v - 1] is None for v in values):
            continue
        box = tuple(
            slice(min(boxes[v - 1][k].start for v in values), max(boxes[v - 1][k].stop for v in values))
            for k in range(3)
        )
        if jitter:
            shift = rng.integers(-jitter, jitter + 1, 3)
            box = tuple(slice(max(0, s.start + int(d)), min(n, s.stop + int(d)))
                        for s, d, n in zip(box, shift, lab.shape))
        start, size = window_bounds(box, lab.shape, config.window, config.max_window)
        image, masks = crop_window(scaled, lab, start, size, config.patch, {m: case.organ_labels[m] for m in members})
        mask = np.zeros(image.shape[1:], dtype=bool)
        for m in members:
            if m in masks:
                mask |= masks[m]
        total = sum(int(counts[v]) for v in values)
        if total == 0 or mask.sum() / total < config.min_inside:
            continue
        bits = np.packbits(mask.ravel())
        out.append(Window(case.case_id, organ, image.astype(np.float16), bits, case.reports[organ]))
    return out


_SEGMENTERS: dict[str, Any] = {}  # bundle directory -> loaded segmenter, one per worker process


def load_segmenter(bundle_dir: str | Path):
    """The MONAI bundle ``bundle_dir`` as a segmenter, loaded once per process.

    Raises ``ai_core.segmentation.SegmentationError`` naming what is wrong with the bundle.
    """
    from ai_core.segmentation import make_segmenter

    key = str(Path(bundle_dir).resolve())
    if key not in _SEGMENTERS:
        _SEGMENTERS[key] = make_segmenter("monai_bundle", bundle_dir=key)
    return _SEGMENTERS[key]


def segmented(case: TrainCase, bundle_dir: str | Path) -> TrainCase:
    """``case`` with its label map replaced by the prediction of the MONAI bundle ``bundle_dir``."""
    from ai_core.volume import CTVolume

    seg = load_segmenter(bundle_dir).segment(CTVolume(image=case.image, files=[], study_uid="", series_uid=case.case_id,
                                            frame_of_reference_uid=None))
    # only organs the case has ground truth for: the others have no report to pair with
    organ_labels = {o: v for o, v in seg.organ_labels.items() if o in case.organ_labels}
    return TrainCase(case.case_id, case.image, seg.labels, organ_labels, case.reports)


def _windows_worker(args: tuple) -> list[Window]:
    source, seed, index, spacing, spec_json, jitter, segmenter = args
    torch.set_num_threads(1)
    spec = ModelSpec.model_validate(spec_json)
    case = next(phantom_cases(seed, [index], spacing))
    if segmenter:
        case = segmented(case, segmenter)
    wins = case_windows(case, spec, np.random.default_rng([seed, index, 17]), jitter)
    # organs without findings to score (the phantom's stomach) are not worth their training time
    return [w for w in wins if spec.findings.get(w.organ)]


def phantom_windows(
    spec: ModelSpec,
    seed: int,
    indices: Sequence[int],
    jitter: int = 0,
    workers: int = 1,
    spacing: Sequence[float] | None = None,
    progress: bool = True,
    desc: str = "phantoms",
    segmenter: str | Path | None = None,
) -> list[Window]:
    """Windows of the balanced phantom cases ``indices`` of set ``seed`` (generated in ``workers`` processes).

    Cut on the phantoms' ground-truth labels, or on the masks the MONAI bundle ``segmenter`` predicts.
    """
    from tqdm import tqdm

    jobs = [("phantom", seed, int(i), spacing, spec.model_dump(mode="json"), jitter,
             str(segmenter) if segmenter else None) for i in indices]
    out: list[Window] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for wins in pool.imap(_windows_worker, jobs):
                out.extend(wins)
                bar.update()
    else:
        threads = torch.get_num_threads()  # the worker pins one thread; the caller's training needs its own
        try:
            for job in jobs:
                out.extend(_windows_worker(job))
                bar.update()
        finally:
            torch.set_num_threads(threads)
    bar.close()
    return out


# -- loss --------------------------------------------------------------------------------------


def fn_calibrated_targets(texts: Sequence[str], normal: Sequence[bool]) -> torch.Tensor:
    """fVLM soft targets: self, identical texts and (normal, normal) pairs are positives; rows sum to 1."""
    t = np.asarray(texts, dtype=object)
    nrm = np.asarray(normal, dtype=bool)
    positive = (t[:, None] == t[None, :]) | (nrm[:, None] & nrm[None, :])
    np.fill_diagonal(positive, True)
    targets = torch.from_numpy(positive.astype(np.float32))
    return targets / targets.sum(1, keepdim=True)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, temp: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Symmetric image-text cross-entropy against soft targets (fVLM ``loss_itc``)."""
    sim = image @ text.t() / temp
    i2t = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(sim.t(), dim=1) * targets).sum(1).mean()
    return (i2t + t2i) / 2


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution per row."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(-1).mean()


# -- the text side, computed once ----------------------------------------------------------------


class TextBank:
    """Pooled text-encoder states of every distinct text, computed once when the tower is frozen."""

    def __init__(self, model: OrganVLP, texts: Iterable[str], batch: int = 64) -> None:
        self.model = model
        self.frozen = model.spec.text.freeze
        self.index: dict[str, int] = {}
        for t in texts:
            self.index.setdefault(t, len(self.index))
        self.hidden: torch.Tensor | None = None
        if self.frozen:
            ordered = list(self.index)
            parts = []
            with torch.no_grad():
                for i in range(0, len(ordered), batch):
                    parts.append(model.text_hidden(**model.tokenize(ordered[i : i + batch])))
            self.hidden = torch.cat(parts) if parts else torch.empty(0, model.spec.text.hidden)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised, projected embeddings (N, E) of texts (gradients flow into the projection)."""
        if self.frozen:
            assert self.hidden is not None
            rows = torch.tensor([self.index[t] for t in texts], dtype=torch.long)
            return self.model.project_text(self.hidden[rows].to(self.model.text_proj.weight.device))
        return self.model.encode_texts(list(texts))


# -- training ----------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything ``train_vlp`` needs besides the spec."""

    out_dir: Path
    seed: int = 0
    train_seed: int = 1000  # phantom set of the training cases
    val_seed: int = 2000  # phantom set of the calibration cases (never used for training)
    n_train: int = 240
    n_val: int = 60
    epochs: int = 8
    batch_cases: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    jitter: int = 3
    noise: float = 0.01  # std of Gaussian noise added to the 0..1 input during training
    shift: int = 4  # random shift (voxels) and left-right mirroring of every window at every step
    # Probability that a window's mask is grown or shrunk by one voxel at a step: inference sees a
    # segmenter's masks, which differ from the ground truth at the border, and a model trained on
    # exact masks reads its focal extremes there too literally.
    mask_jitter: float = 0.0
    weight_itc: float = 0.5
    weight_dictionary: float = 0.25
    weight_prompts: float = 1.0
    workers: int = 2
    threads: int = 2
    device: str = "cpu"
    resume: bool = True
    progress: bool = True
    data_dir: Path | None = None  # a directory of cases instead of phantoms
    val_fraction: float = 0.2  # of the directory cases kept for calibration
    dictionary: dict[str, dict[str, list[str]]] | None = None  # organ -> {"normal"|finding: [texts]}
    init_from: str | None = None  # fine-tune: start from this checkpoint's weights (see init_from_checkpoint)
    segmenter: str | None = None  # cut windows on this MONAI bundle's predicted masks, not the true labels

    def to_json(self) -> dict:
        """JSON-serialisable form (stored in checkpoints)."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        return d


def seed_everything(seed: int) -> None:
    """Fixed seeds for Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def phantom_dictionary() -> dict[str, dict[str, list[str]]]:
    """CT-GLIP abnormality dictionary of the phantom organs: normal phrasings and each abnormality's."""
    from ai_core.phantom.reports import NORMAL_SENTENCES, abnormality_dictionary

    out = {}
    for organ, per in abnormality_dictionary().items():
        out[organ] = {"normal": list(NORMAL_SENTENCES.get(organ, ())), **{f: list(v) for f, v in per.items()}}
    return out


def phantom_demo_spec(name: str = "ct-vlp demo (phantom-trained)", version: str | None = None,
                      relative_channel: bool = False, lesion_scales_mm: Sequence[float] = (),
                      relative_extra_scales_hu: Sequence[float] = (),
                      focal_floor_hu: float | None = None) -> ModelSpec:
    """The demo model: small ViT on 3 x 3 x 4.5 mm windows, frozen MiniLM text tower, phantom findings.

    ``relative_channel``: with the organ-relative contrast channel, as the shipped demo 1.2;
    ``lesion_scales_mm``: with that contrast also averaged at these scales (tried, not shipped);
    ``relative_extra_scales_hu``: with that contrast also clipped at these wider scales (1.5);
    ``focal_floor_hu``: the focal minimum skips blocks with a voxel below this HU (1.7).
    The version defaults to 1.3, 1.2 or 1.1 by the channels the spec has.

    Sizes were chosen for CPU training in minutes: windows of 144 x 144 x 192 mm (z, y, x; larger
    organs get larger windows and an interpolated position embedding), 24-36 mm tokens.
    """
    from ai_core.phantom.findings import FINDINGS, PHANTOM_ORGANS
    from ai_core.phantom.reports import prompt_pair

    findings = {
        organ: tuple(FindingSpec(key=f, negative=prompt_pair(organ, f)[0], positive=prompt_pair(organ, f)[1])
                     for f in FINDINGS[organ])
        for organ in PHANTOM_ORGANS
        if FINDINGS[organ]
    }
    return ModelSpec(
        name=name,
        version=version or ("1.3" if lesion_scales_mm else "1.2" if relative_channel else "1.1"),
        demo=True,
        organs=PHANTOM_ORGANS,
        embed_dim=128,
        vision=VisionSpec(
            window=(32, 48, 64), patch=(8, 8, 8), hidden=96, depth=3, heads=4, mlp_dim=192, taps=(0, 1),
            stem=(16, 32), mask_channel=True, focal=(16, 16, 32), relative_channel=relative_channel,
            lesion_scales_mm=tuple(float(v) for v in lesion_scales_mm),
            relative_extra_scales_hu=tuple(float(v) for v in relative_extra_scales_hu),
            focal_floor_hu=focal_floor_hu,
            # lung parenchyma (emphysema), soft tissue (lesions, cysts, steatosis, fluid), calcium
            input_windows=((-1000.0, -700.0), (-150.0, 250.0), (200.0, 1000.0)),
        ),
        pooling=PoolingSpec(kind="fvlm_query", heads=4, dropout=0.1, batch_norm=True, token_max=True),
        text=TextSpec(source=MINILM_PACKAGE, hidden=384, layers=6, heads=12, intermediate=1536, max_length=64,
                      padding="longest", pooling="mean", freeze=True),
        preprocess=PreprocessSpec(spacing_mm=(3.0, 3.0, 4.5), hu_window=(-1000.0, 1000.0), min_window=(32, 48, 64)),
        findings=findings,
    )


def _augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, shift: int,
             mask_jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    # A different small shift (and left-right mirror) of every window at every step, so the
    # model cannot learn the cases by heart instead of the findings.
    if mask_jitter and rng.random() < mask_jitter:
        mask = jitter_mask(mask, rng)
    d = [int(v) for v in rng.integers(-shift, shift + 1, 3)]
    image, mask = np.roll(image, d, axis=(1, 2, 3)), np.roll(mask, d, axis=(0, 1, 2))
    if rng.random() < 0.5:
        image, mask = image[:, :, :, ::-1], mask[:, :, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def jitter_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask grown or shrunk (even odds) by one voxel in-plane, or also along the slices (a
    segmenter's border errors); never shrunk to nothing."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1)
    if rng.random() < 0.5:
        structure[0] = structure[2] = False  # in-plane only
    if rng.random() < 0.5:
        return ndimage.binary_dilation(mask, structure)
    shrunk = ndimage.binary_erosion(mask, structure)
    return shrunk if shrunk.any() else mask


def forward_windows(
    model: OrganVLP, windows: Sequence[Window], noise: float = 0.0, shift: int = 0,
    rng: np.random.Generator | None = None, mask_jitter: float = 0.0,
) -> torch.Tensor:
    """Normalised organ embeddings (N, E) of windows, encoder run once per group of equal shapes.

    ``noise``, ``shift`` and ``mask_jitter`` augment (training only): Gaussian noise on the 0..1
    input, random shifts up to ``shift`` voxels and left-right mirroring, masks grown or shrunk by
    a voxel (see ``TrainConfig.mask_jitter``).
    """
    device = model.text_proj.weight.device
    rng = rng or np.random.default_rng()
    out: list[torch.Tensor | None] = [None] * len(windows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w.shape, []).append(i)
    for idx in groups.values():
        pairs = [(windows[i].image, windows[i].mask()) for i in idx]
        if shift > 0 or mask_jitter > 0:
            pairs = [_augment(im, m, rng, shift, mask_jitter) for im, m in pairs]
        image = torch.from_numpy(np.stack([im for im, _ in pairs])).to(device=device, dtype=torch.float32)
        if noise > 0:
            image = image + noise * torch.randn_like(image)
        masks = [torch.from_numpy(m).to(device) for _, m in pairs]
        levels = model.image_levels(image, torch.stack(masks) if model.spec.vision.mask_channel else None)
        for b, i in enumerate(idx):
            organ = model.spec.organ_index(windows[i].organ)
            out[i] = model.pool_organ(levels, b, organ, masks[b])
    # projections per organ over the whole batch (batch statistics when the spec normalises)
    by_organ: dict[str, list[int]] = {}
    for i, w in enumerate(windows):
        by_organ.setdefault(w.organ, []).append(i)
    result: list[torch.Tensor | None] = [None] * len(windows)
    for organ, idx in by_organ.items():
        pooled = torch.stack([out[i] for i in idx])  # type: ignore[misc]
        emb = model.project_image(pooled, model.spec.organ_index(organ))
        for k, i in enumerate(idx):
            result[i] = emb[k]
    return torch.stack(result)  # type: ignore[arg-type]


@dataclass
class BatchLoss:
    """The parts of one step's loss."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def batch_loss(
    model: OrganVLP,
    windows: Sequence[Window],
    embeds: torch.Tensor,
    bank: TextBank,
    dictionary: Mapping[str, Mapping[str, Sequence[str]]],
    config: TrainConfig,
) -> BatchLoss:
    """fVLM contrastive + CT-GLIP dictionary + prompt-pair losses, averaged over the organs in the batch."""
    temp = model.temp
    itc, dic, prm = [], [], []
    by_organ: dict[str, list[int]] = {}
    for i, w in enumerate(windows):
        by_organ.setdefault(w.organ, []).append(i)
    for organ, idx in by_organ.items():
        img = embeds[idx]
        reports = [windows[i].report for i in idx]
        if len(idx) > 1:
            targets = fn_calibrated_targets([r.text for r in reports], [r.normal for r in reports])
            if not torch.all(targets == targets[0, 0]):  # all positives of each other: nothing to learn
                itc.append(contrastive_loss(img, bank.embed([r.text for r in reports]), temp, targets.to(img.device)))
        entries = dictionary.get(organ, {})
        if entries:
            keys = [k for k, texts in entries.items() for _ in texts]
            texts = [t for _, ts in entries.items() for t in ts]
            logits = img @ bank.embed(texts).t() / temp
            tgt = torch.zeros_like(logits)
            for row, r in enumerate(reports):
                present = {f for f, v in r.findings.items() if v}
                wanted = present if present else {"normal"}
                cols = [c for c, k in enumerate(keys) if k in wanted]
                if cols:
                    tgt[row, cols] = 1.0 / len(cols)
            keep = tgt.sum(1) > 0
            if keep.any():
                dic.append(soft_cross_entropy(logits[keep], tgt[keep]))
        for f in model.spec.findings.get(organ, ()):
            pair = bank.embed([f.negative, f.positive])
            logits = img @ pair.t() / temp
            labels = torch.tensor([int(r.findings.get(f.key, False)) for r in reports], device=img.device)
            prm.append(F.cross_entropy(logits, labels))
    parts = {}
    total = embeds.new_zeros(())
    for name, values, weight in (("itc", itc, config.weight_itc), ("dictionary", dic, config.weight_dictionary),
                                 ("prompts", prm, config.weight_prompts)):
        if values and weight > 0:
            v = torch.stack(values).mean()
            total = total + weight * v
            parts[name] = float(v.detach())
    return BatchLoss(total, parts)


@torch.no_grad()
def recompute_norm_statistics(model: OrganVLP, windows: Sequence[Window], batch_cases: int) -> None:
    """Re-estimate the running statistics of ``vision_norms`` with the final weights (precise BN)."""
    if not hasattr(model, "vision_norms"):
        return
    was_training = model.training
    model.eval()
    model.collect_norm_stats = True
    saved = []
    for norm in model.vision_norms:
        norm.reset_running_stats()
        saved.append(norm.momentum)
        norm.momentum = None  # cumulative average over the pass
    try:
        for batch in _batches(windows, max(2, batch_cases), random.Random(0)):
            forward_windows(model, batch)
    finally:
        model.collect_norm_stats = False
        for norm, m in zip(model.vision_norms, saved):
            norm.momentum = m
        model.train(was_training)


def _batches(windows: Sequence[Window], batch_cases: int, rng: random.Random) -> list[list[Window]]:
    cases: dict[str, list[Window]] = {}
    for w in windows:
        cases.setdefault(w.case_id, []).append(w)
    ids = sorted(cases)
    rng.shuffle(ids)
    return [[w for cid in ids[i : i + batch_cases] for w in cases[cid]] for i in range(0, len(ids), batch_cases)]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_vlp(
    spec: ModelSpec,
    config: TrainConfig,
    train_windows: Sequence[Window] | None = None,
    val_windows: Sequence[Window] | None = None,
    on_step: Callable[[int, BatchLoss], None] | None = None,
) -> Path:
    """Train, checkpoint every epoch (resumable), calibrate thresholds; returns the final model path."""
    from tqdm import tqdm

    torch.set_num_threads(max(1, config.threads))
    seed_everything(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    t0 = time.perf_counter()

    model = build_model(spec)
    if config.init_from and not (config.resume and ckpt_path.is_file()):
        # before the windows are made: a wrong --init fails in seconds, not after the phantoms
        widened = init_from_checkpoint(model, config.init_from)
        log.info("starting from the weights in %s%s", config.init_from,
                 f" (new input channels in {', '.join(widened)})" if widened else "")
    model = model.to(config.device)
    if train_windows is None or val_windows is None:
        train_windows, val_windows = load_windows(spec, config)
    dictionary = config.dictionary if config.dictionary is not None else phantom_dictionary_if_phantoms(config)

    texts = {w.report.text for w in train_windows}
    texts |= {t for per in dictionary.values() for ts in per.values() for t in ts}
    texts |= {t for items in spec.findings.values() for f in items for t in (f.negative, f.positive)}
    bank = TextBank(model, sorted(texts))

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    n_batches = math.ceil(len({w.case_id for w in train_windows}) / config.batch_cases)
    total_steps = n_batches * config.epochs
    epoch, step = 0, 0
    history: list[dict] = []
    if config.resume and ckpt_path.is_file():
        model, payload = load_checkpoint(ckpt_path, device=config.device)
        model.train()
        bank.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=config.lr,
        )
        state = payload["training"]
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state.get("history", []))
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming from %s at epoch %d (step %d)", ckpt_path, epoch, step)

    model.train()
    while epoch < config.epochs:
        rng = random.Random(config.seed * 1000 + epoch)
        np_rng = np.random.default_rng([config.seed, epoch])
        batches = _batches(train_windows, config.batch_cases, rng)
        bar = tqdm(batches, desc=f"vlp epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not config.progress)
        sums: dict[str, float] = {}
        for batch in bar:
            for g in optimizer.param_groups:
                g["lr"] = config.lr * _lr_factor(step, total_steps, config.warmup_steps)
            embeds = forward_windows(model, batch, noise=config.noise, shift=config.shift, rng=np_rng,
                                     mask_jitter=config.mask_jitter)
            loss = batch_loss(model, batch, embeds, bank, dictionary, config)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            with torch.no_grad():
                model.temp.clamp_(0.001, 0.5)  # as the reference
            step += 1
            for k, v in {"loss": float(loss.total.detach()), **loss.parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{float(loss.total.detach()):.3f}", temp=f"{model.temp.item():.3f}")
            if on_step:
                on_step(step, loss)
        epoch += 1
        history.append({"epoch": epoch, **{k: v / max(1, len(batches)) for k, v in sums.items()},
                        "seconds": round(time.perf_counter() - t0, 1)})
        log.info("epoch %d: %s", epoch, history[-1])
        save_checkpoint(ckpt_path, model, training={
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": history,
            "torch_rng": torch.get_rng_state(), "config": config.to_json(),
        })

    model.eval()
    recompute_norm_statistics(model, train_windows, config.batch_cases)
    thresholds, metrics = calibrate(model, val_windows)
    final_spec = model.spec.with_updates(thresholds=thresholds)
    final = build_model(final_spec)
    final.load_state_dict(model.state_dict())
    model_path = save_checkpoint(out / "model.pt", final.eval())
    report = {"history": history, "validation": metrics, "thresholds": thresholds,
              "train_windows": len(train_windows), "val_windows": len(val_windows),
              "seconds": round(time.perf_counter() - t0, 1), "spec_hash": final_spec.spec_hash(),
              "config": config.to_json()}
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return model_path


def phantom_dictionary_if_phantoms(config: TrainConfig) -> dict[str, dict[str, list[str]]]:
    """The phantom abnormality dictionary when training on phantoms, else none."""
    return phantom_dictionary() if config.data_dir is None else {}


def _cached(path: Path, make: Callable[[], list[Window]]) -> list[Window]:
    # Phantom windows are deterministic: keep them beside the checkpoints so a resumed or
    # repeated run does not generate them again.
    import pickle

    if path.is_file():
        with path.open("rb") as fh:
            return pickle.load(fh)
    windows = make()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(windows, fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return windows


def segmenter_fingerprint(bundle_dir: str | Path | None) -> str | None:
    """A hash of a bundle's configs and weights, so cached windows follow a changed segmenter."""
    if not bundle_dir:
        return None
    import hashlib

    h = hashlib.sha256()
    root = Path(bundle_dir)
    for p in sorted([*root.glob("configs/*.json"), *root.glob("models/*.pt")]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_windows(spec: ModelSpec, config: TrainConfig) -> tuple[list[Window], list[Window]]:
    """Training and validation windows from phantoms (disjoint seeds) or from a directory."""
    if config.data_dir is None:
        import hashlib

        key = json.dumps([spec.preprocess.model_dump(mode="json"), spec.vision.patch, spec.organs,
                          sorted(spec.findings), segmenter_fingerprint(config.segmenter)], sort_keys=True)
        tag = hashlib.sha256(key.encode()).hexdigest()[:10]
        out = Path(config.out_dir)
        train = _cached(out / f"windows-{config.train_seed}-{config.n_train}-j{config.jitter}-{tag}.pkl",
                        lambda: phantom_windows(spec, config.train_seed, range(config.n_train), config.jitter,
                                                config.workers, progress=config.progress, desc="training phantoms",
                                                segmenter=config.segmenter))
        val = _cached(out / f"windows-{config.val_seed}-{config.n_val}-j0-{tag}.pkl",
                      lambda: phantom_windows(spec, config.val_seed, range(config.n_val), 0, config.workers,
                                              progress=config.progress, desc="validation phantoms",
                                              segmenter=config.segmenter))
        return train, val
    rng = np.random.default_rng(config.seed)
    cases = list(directory_cases(config.data_dir))
    order = rng.permutation(len(cases))
    n_val = max(1, int(round(len(cases) * config.val_fraction)))
    val_ids = {cases[i].case_id for i in order[:n_val]}
    train, val = [], []
    for c in cases:
        if config.segmenter:
            c = segmented(c, config.segmenter)
        target = val if c.case_id in val_ids else train
        target.extend(case_windows(c, spec, rng, 0 if c.case_id in val_ids else config.jitter))
    return train, val


# -- calibration and evaluation ------------------------------------------------------------------


@torch.no_grad()
def window_probabilities(model: OrganVLP, windows: Sequence[Window], batch: int = 32) -> list[dict[str, float]]:
    """Zero-shot probability of every finding of each window's organ."""
    from ai_core.zeroshot import ZeroShotScorer

    scorer = ZeroShotScorer(model)
    out: list[dict[str, float]] = []
    model.eval()
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        emb = forward_windows(model, chunk)
        out.extend(scorer.probabilities(w.organ, e) for w, e in zip(chunk, emb))
    return out


def finding_metrics(
    windows: Sequence[Window], probs: Sequence[Mapping[str, float]], thresholds: Mapping[str, float] | None = None
) -> dict[str, dict[str, float]]:
    """AUC (and, with thresholds, sensitivity and specificity) per "organ/finding"."""
    from sklearn.metrics import roc_auc_score

    scores: dict[str, tuple[list[float], list[int]]] = {}
    for w, p in zip(windows, probs):
        for f, v in p.items():
            s = scores.setdefault(f"{w.organ}/{f}", ([], []))
            s[0].append(v)
            s[1].append(int(w.report.findings.get(f, False)))
    out = {}
    for key, (s, y) in sorted(scores.items()):
        y_arr, s_arr = np.asarray(y), np.asarray(s)
        m: dict[str, float] = {"n": len(y), "positives": int(y_arr.sum())}
        if 0 < y_arr.sum() < len(y_arr):
            m["auc"] = float(roc_auc_score(y_arr, s_arr))
        if thresholds is not None and key in thresholds:
            pred = s_arr >= thresholds[key]
            if y_arr.sum():
                m["sensitivity"] = float((pred & (y_arr == 1)).sum() / y_arr.sum())
            if (y_arr == 0).sum():
                m["specificity"] = float((~pred & (y_arr == 0)).sum() / (y_arr == 0).sum())
        out[key] = m
    return out


def calibrate(model: OrganVLP, windows: Sequence[Window]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per-finding thresholds (Youden's J) on validation windows, and the metrics there."""
    probs = window_probabilities(model, windows)
    per: dict[str, tuple[list[float], list[int]]] = {}
    for w, p in zip(windows, probs):
        for f, v in p.items():
            s = per.setdefault(f"{w.organ}/{f}", ([], []))
            s[0].append(v)
            s[1].append(int(w.report.findings.get(f, False)))
    thresholds = {k: round(youden_threshold(s, y), 6) for k, (s, y) in per.items()}
    return thresholds, finding_metrics(windows, probs, thresholds)


def evaluate_heldout(
    model: OrganVLP, seed: int, n: int, workers: int = 1, progress: bool = True,
    segmenter: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of a trained model on windows of ``n`` fresh balanced phantoms of set ``seed``.

    Windows are cut on the ground-truth labels, or on the masks of the MONAI bundle ``segmenter``.
    """
    windows = phantom_windows(model.spec, seed, range(n), 0, workers, progress=progress, desc="held-out phantoms",
                              segmenter=segmenter)
    probs = window_probabilities(model, windows)
    return finding_metrics(windows, probs, model.spec.thresholds)


def summarize(metrics: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    """(macro AUC, minimum AUC) over the findings that have both classes."""
    aucs = [m["auc"] for m in metrics.values() if "auc" in m]
    return (float(np.mean(aucs)), float(np.min(aucs))) if aucs else (float("nan"), float("nan"))


# -- command line (``dicom-node train vlp``; the hook lives in dicom_node/commands/train.py) ---------


def add_cli_arguments(parser) -> None:
    """Options of ``dicom-node train vlp``."""
    parser.description = (
        "Organ-level contrastive training of the VLP model (fVLM loss with false-negative calibration, "
        "CT-GLIP abnormality dictionary) on synthetic phantoms or on a directory of cases; thresholds "
        "calibrated on held-out cases. Resumes from WORK/checkpoint.pt when it exists."
    )
    parser.add_argument("--work-dir", default="vlp-work", help="checkpoints and logs (created; resumed from)")
    parser.add_argument("--out", default=None,
                        help="directory for the final model.pt (default: the package's ai_core/models/demo_vlp)")
    parser.add_argument("--train-cases", type=int, default=200, help="training phantoms (default 200)")
    parser.add_argument("--val-cases", type=int, default=40, help="calibration phantoms, other seeds (default 40)")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training cases (default 8)")
    parser.add_argument("--batch-cases", type=int, default=8, help="cases per step, all their organs (default 8)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch order (default 0)")
    parser.add_argument("--train-seed", type=int, default=1000, help="phantom set of the training cases")
    parser.add_argument("--val-seed", type=int, default=2000, help="phantom set of the calibration cases")
    parser.add_argument("--pooling", choices=("fvlm_query", "ctglip_mask_avg", "radclip_slice"), default="fvlm_query",
                        help="pooling head (default fvlm_query)")
    parser.add_argument("--data-dir", default=None,
                        help="train on case folders (image.nii.gz or series/, labels.nii.gz, truth.json) instead")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when torch sees a GPU; default cpu)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument("--init", default=None, metavar="MODEL_PT",
                        help="fine-tune: start from this model.pt instead of random weights (same architecture, "
                             "or the same plus --relative-channel)")
    parser.add_argument("--relative-channel", action="store_true",
                        help="give the encoder the organ's contrast to its own median HU as one more input "
                             "channel (vision.relative_channel)")
    parser.add_argument("--lesion-scales", default="", metavar="MM[,MM...]",
                        help="with --relative-channel: that contrast also averaged inside the organ with Gaussians "
                             "of these sigmas in mm, one more channel each (vision.lesion_scales_mm, e.g. 4,8)")
    parser.add_argument("--wide-contrast", default="", metavar="HU[,HU...]",
                        help="with --relative-channel: that contrast also clipped at these wider scales, one more "
                             "channel each (vision.relative_extra_scales_hu, e.g. 150: tells water-density cysts "
                             "from hypodense lesions, which both read -1 at the default 50 HU)")
    parser.add_argument("--focal-floor", type=float, default=None, metavar="HU",
                        help="the focal path's minimum skips 2x2x2 blocks with a voxel below this HU "
                             "(vision.focal_floor_hu, e.g. -30: a mask that reaches into the fat around a "
                             "small organ then does not read as a cyst; default: off)")
    parser.add_argument("--mask-jitter", type=float, default=0.0, metavar="P",
                        help="probability that a window's organ mask is grown or shrunk by one voxel at a step, "
                             "so the model tolerates a segmenter's borders (default 0)")
    parser.add_argument("--noise", type=float, default=0.01, metavar="STD",
                        help="std of the Gaussian noise added to the 0..1 input at each step (default 0.01, "
                             "20 HU on the demo's -1000..1000 scale); lower it when subtle contrasts matter")
    parser.add_argument("--segmenter", default=None, metavar="BUNDLE",
                        help="cut the organ windows on the masks this MONAI bundle predicts (e.g. "
                             "ai_core/models/demo_seg) instead of the ground-truth labels, for training, "
                             "calibration and the held-out score, as fVLM trains on TotalSegmentator masks")
    parser.add_argument("--model-version", default=None,
                        help="version written into the model's spec (default: the demo spec's)")
    parser.add_argument("--eval-cases", type=int, default=40,
                        help="fresh held-out phantoms scored after training (default 40; 0: none)")
    parser.add_argument("--eval-seed", type=int, default=3000, help="phantom set of the held-out cases")


def _relative_option(args, flag: str, text: str, what: str, example: str, verb: str) -> tuple[float, ...]:
    """The numbers of a comma-separated option that builds on --relative-channel (a one-line error otherwise)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give {what} separated by commas, e.g. {example}") from None
    if values and not args.relative_channel:
        raise ValueError(f"{flag} {verb} the organ-relative contrast: add --relative-channel")
    return values


def run_cli(args) -> int:
    """Run ``dicom-node train vlp``: train, calibrate, write model.pt and its training record."""
    import shlex
    import shutil
    import sys

    from ai_core.pipeline import resolve_device

    logging.getLogger("ai_core").setLevel(logging.INFO)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "models" / "demo_vlp"
    scales = _relative_option(args, "--lesion-scales", args.lesion_scales, "sigmas in mm", "4,8", "averages")
    wide = _relative_option(args, "--wide-contrast", args.wide_contrast, "scales in HU", "150", "rescales")
    spec = phantom_demo_spec(relative_channel=args.relative_channel, lesion_scales_mm=scales,
                             relative_extra_scales_hu=wide, focal_floor_hu=args.focal_floor)
    if args.model_version:
        spec = spec.with_updates(version=args.model_version)
    if args.pooling != spec.pooling.kind:
        spec = spec.with_updates(pooling={**spec.pooling.model_dump(), "kind": args.pooling})
    if args.noise < 0:
        raise ValueError(f"--noise {args.noise}: give a standard deviation of 0 or more")
    if not 0.0 <= args.mask_jitter <= 1.0:
        raise ValueError(f"--mask-jitter {args.mask_jitter} is a probability: give a value from 0 to 1")
    if min(args.train_cases, args.val_cases, args.epochs, args.batch_cases) < 1:
        raise ValueError("--train-cases, --val-cases, --epochs and --batch-cases must be at least 1")
    config = TrainConfig(
        out_dir=Path(args.work_dir), seed=args.seed, train_seed=args.train_seed, val_seed=args.val_seed,
        n_train=args.train_cases, n_val=args.val_cases, epochs=args.epochs, batch_cases=args.batch_cases,
        lr=args.lr, threads=args.threads, workers=args.workers, device=resolve_device(args.device),
        resume=not args.no_resume,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        init_from=str(Path(args.init).resolve()) if args.init else None, mask_jitter=args.mask_jitter,
        segmenter=str(Path(args.segmenter).resolve()) if args.segmenter else None, noise=args.noise,
    )
    if config.segmenter:
        from ai_core.segmentation import SegmentationError

        try:  # a bundle that cannot be used fails now, not in a worker after the first phantom
            load_segmenter(config.segmenter)
        except SegmentationError as exc:
            raise ValueError(f"--segmenter {args.segmenter}: {exc}") from exc
    t0 = time.perf_counter()
    model_path = train_vlp(spec, config)
    seconds = time.perf_counter() - t0
    record = json.loads((config.out_dir / "training.json").read_text())
    record["command"] = " ".join(shlex.quote(a) for a in ["dicom-node", *sys.argv[1:]])
    record["wall_seconds"] = round(seconds, 1)
    if config.init_from:
        # the chain of runs that made a fine-tuned model stays known: keep its parent's record
        parent = Path(config.init_from).with_name("training.json")
        if not parent.is_file():
            log.warning("no training.json beside --init %s: the new record cannot name the runs that made it",
                        config.init_from)
        record["initial_weights"] = {"path": config.init_from,
                                     **({"training": json.loads(parent.read_text())} if parent.is_file() else {})}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, out / "model.pt")
    final_spec = ModelSpec.model_validate(read_checkpoint(out / "model.pt")["spec"])
    # a readable copy of what the checkpoint holds (the checkpoint's own spec is authoritative)
    (out / "spec.json").write_text(json.dumps(final_spec.model_dump(mode="json"), indent=2))
    (out / "training.json").write_text(json.dumps(record, indent=2))
    metrics, what = record["validation"], "calibration split"
    if args.eval_cases > 0 and config.data_dir is None:
        model, _ = load_checkpoint(out / "model.pt")
        metrics = evaluate_heldout(model, args.eval_seed, args.eval_cases, args.workers,
                                   segmenter=config.segmenter)
        what = f"{args.eval_cases} held-out phantoms of set {args.eval_seed}"
        record["held_out"] = {"seed": args.eval_seed, "cases": args.eval_cases, "metrics": metrics}
        (out / "training.json").write_text(json.dumps(record, indent=2))
    macro, worst = summarize(metrics)
    masks = "segmenter" if config.segmenter else "ground-truth"
    print(f"{what} ({masks} organ windows): finding, AUC, sensitivity, specificity, threshold")
    for key, m in metrics.items():
        print(f"  {key:32s} {m.get('auc', float('nan')):.3f}  {m.get('sensitivity', float('nan')):.2f}  "
              f"{m.get('specificity', float('nan')):.2f}  {record['thresholds'].get(key, 0.5):.3f}")
    print(f"model written to {out / 'model.pt'} ({(out / 'model.pt').stat().st_size / 1e6:.1f} MB) in {seconds:.0f} s")
    print(f"macro_auc={macro:.3f} min_auc={worst:.3f}")
    return 0
