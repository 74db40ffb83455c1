"""Training the demo organ segmentation network on synthetic phantoms, exported as a MONAI bundle.

    config = SegTrainConfig(work_dir=Path("runs/seg"))
    train_segmentation(config)            # checkpoints every N steps; resumes from the last one
    export_bundle(config, DEMO_BUNDLE)    # configs/ + models/model.pt, loadable by the builtin backend

Inputs go through exactly the inference path (``BundleInput`` built from the bundle config the
export writes), so the network sees at training time what it sees in the node. Phantoms are
generated at several spacings and orientations, so resampling and reorientation are part of what
it learns. Everything is seeded: the same config gives the same cases, patches and weights.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ai_core.geometry import resample_nearest
from ai_core.segmentation.bundle import inference_config, write_bundle

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Generation spacings and orientations of training phantoms (mm; x, y, z).
FOCAL_FINDINGS = ("cyst", "lesion")  # placed findings that focal patches are centred on
TRAIN_SPACINGS = ((3.0, 3.0, 4.5), (2.0, 2.0, 3.0), (1.5, 1.5, 3.0), (2.5, 2.5, 2.5))
TRAIN_ORIENTATIONS = ("HFS", "HFS", "FFS", "HFP", "FFP", "sagittal", "coronal")


@dataclass
class SegTrainConfig:
    """Everything that determines a training run (saved in every checkpoint and in the bundle)."""

    work_dir: Path
    seed: int = 0
    train_cases: int = 40
    val_cases: int = 6
    steps: int = 1500
    batch_size: int = 2
    patch: tuple[int, int, int] = (64, 64, 64)
    lr: float = 5e-3
    weight_decay: float = 1e-4
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0)  # network grid, mm (RAS x, y, z)
    # One input channel per HU window: the wide one sees air, lung and bone, the narrow one the
    # 10-50 HU differences between abdominal organs that the wide one squeezes into 2 % of its range.
    hu_ranges: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-160.0, 240.0))
    norm: str = "batch"  # batch norm: at inference each voxel depends on its neighbourhood only
    channels: tuple[int, ...] = (8, 16, 32, 64)
    num_res_units: int = 1
    roi_size: tuple[int, int, int] = (128, 128, 128)  # inference window of the exported bundle
    organ_fraction: float = 0.9  # patches centred on a (uniformly chosen) organ, else anywhere
    # Share of patches centred on a placed cyst or lesion instead. Such a spot is a few hundred
    # voxels of a case, so a segmenter trained on organ-centred patches rarely sees one and learns
    # to cut it out of its organ, which then hides it from the findings model reading that mask.
    focal_fraction: float = 0.0
    checkpoint_every: int = 100
    threads: int = 2
    device: str = "cpu"  # cpu, cuda or auto (cuda when torch sees a GPU)
    phantom_spacings: tuple[tuple[float, float, float], ...] = TRAIN_SPACINGS  # generation grids
    organs: tuple[str, ...] = field(default_factory=tuple)  # default: every phantom organ
    # Draw training and validation phantoms from balanced finding sets (each finding present in
    # about a third of the cases, combinations included) instead of at random, so that the rarer
    # appearances (a steatotic enlarged liver beside the kidney) are seen often enough.
    balanced_findings: bool = False
    # Start from these weights (a bundle directory or its models/model.pt) instead of at random:
    # fine-tuning. Same network (channels, inputs, organs); a fresh optimizer and schedule.
    init_from: str | None = None

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        if not self.organs:
            from ai_core.phantom.findings import PHANTOM_ORGANS

            self.organs = tuple(PHANTOM_ORGANS)

    def to_json(self) -> dict:
        """A JSON-serialisable form (paths as strings)."""
        d = asdict(self)
        d["work_dir"] = str(self.work_dir)
        # JSON has no tuples: compare and store lists, so a reloaded config equals a fresh one.
        return json.loads(json.dumps(d))

    def network_def(self) -> dict:
        """The MONAI config of the network (``_target_`` form, as stored in the bundle)."""
        return {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": len(self.hu_ranges),
            "out_channels": len(self.organs) + 1,
            "channels": list(self.channels),
            "strides": [2] * (len(self.channels) - 1),
            "num_res_units": self.num_res_units,
            "norm": self.norm,
        }

    def channel_def(self) -> dict[int, str]:
        """Class value -> catalogue organ key (0 is background)."""
        return {0: "background", **{i + 1: o for i, o in enumerate(self.organs)}}


def config_from_json(d: dict) -> SegTrainConfig:
    """The config saved in a checkpoint (lists back to tuples)."""
    d = dict(d)
    for key in ("patch", "spacing", "channels", "roi_size", "organs"):
        d[key] = tuple(d[key])
    for key in ("hu_ranges", "phantom_spacings"):
        d[key] = tuple(tuple(v) for v in d[key])
    d["work_dir"] = Path(d["work_dir"])
    return SegTrainConfig(**d)


def load_checkpoint(work_dir: Path) -> tuple[SegTrainConfig, torch.nn.Module, dict[str, float], int]:
    """Config, network, last validation Dice and step of the checkpoint in ``work_dir``."""
    path = Path(work_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"no checkpoint in {work_dir}; train first (dicom-node train segmentation --work-dir ...)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = config_from_json(state["config"])
    network = build_network(config)
    network.load_state_dict(state["model"])
    dice = state["history"][-1]["dice"] if state["history"] else {}
    return config, network, dice, int(state["step"])


@dataclass
class TrainCase:
    """One phantom on the network grid: scaled image (C, x, y, z) float16 and class labels (x, y, z) uint8."""

    image: np.ndarray
    labels: np.ndarray
    # (N, 3) grid indices of the centres of its cysts and lesions (none: organ-centred patches only)
    focal: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))


def build_network(config: SegTrainConfig) -> torch.nn.Module:
    """The network described by ``config.network_def()``."""
    from monai.bundle import ConfigParser

    return ConfigParser({"net": config.network_def()}).get_parsed_content("net")


def bundle_input(config: SegTrainConfig):
    """The exact inference preprocessing of the bundle this config exports."""
    from monai.bundle import ConfigParser

    from ai_core.segmentation.monai_bundle import BundleInput

    cfg = inference_config(config.network_def(), spacing=config.spacing, roi_size=config.roi_size,
                           hu_ranges=config.hu_ranges)
    return BundleInput(ConfigParser(cfg))


def make_case(config: SegTrainConfig, prep, split: str, index: int) -> TrainCase:
    """Phantom ``index`` of ``split`` ("train"/"val"), through the inference preprocessing."""
    from ai_core.phantom.generator import generate_case

    rng = random.Random(f"{config.seed}:{split}:{index}")
    base = (config.seed * 1_000_003 + (0 if split == "train" else 500_000)) & 0x7FFFFFFF
    seed = (base + index) & 0x7FFFFFFF
    spacing = tuple(rng.choice(config.phantom_spacings))
    orientation = rng.choice(TRAIN_ORIENTATIONS)
    if config.balanced_findings:
        # the balanced set of the split's seed; held_out_seeds (900_000 + i) are never such a set
        case = generate_case(base, balanced_index=index, spacing=spacing, orientation=orientation)
    else:
        case = generate_case(seed, spacing=spacing, orientation=orientation)
    spots = [f.center_lps for f in case.findings if f.present and f.finding in FOCAL_FINDINGS and f.center_lps]
    return to_network_grid(config, prep, case.image, case.labels, case.organ_labels, spots)


def to_network_grid(config: SegTrainConfig, prep, image: sitk.Image, labels: sitk.Image,
                    organ_labels: dict[str, int], spots_lps: Sequence[Sequence[float]] = ()) -> TrainCase:
    """An image and its organ labels on the network grid, classes in ``config.organs`` order.

    ``spots_lps``: centres (LPS mm) of focal findings, kept as grid indices for focal patches.
    """
    x = prep(image)
    grid = prep.grid(x)
    lab = sitk.GetArrayFromImage(resample_nearest(labels, grid)).transpose(2, 1, 0)
    lut = np.zeros(256, dtype=np.uint8)
    for i, organ in enumerate(config.organs):
        if organ in organ_labels:
            lut[organ_labels[organ]] = i + 1
    # the label arrays are (x, y, z), the order of SimpleITK's (i, j, k) index
    focal = np.array([grid.TransformPhysicalPointToIndex(tuple(float(v) for v in p)) for p in spots_lps],
                     dtype=np.int64).reshape(-1, 3)
    inside = np.all((focal >= 0) & (focal < np.array(lab.shape)), axis=1)
    return TrainCase(image=x.as_tensor().numpy().astype(np.float16), labels=lut[lab], focal=focal[inside])


def sample_patch(case: TrainCase, patch: Sequence[int], rng: np.random.Generator, n_classes: int,
                 organ_fraction: float, focal_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A patch (padded where the volume is smaller), centred on a focal finding, a random organ or anywhere.

    A case without focal findings (``case.focal``) draws an organ-centred patch instead.
    """
    shape = np.asarray(case.labels.shape)
    p = np.asarray(patch)
    centre = None
    if focal_fraction and len(case.focal) and rng.random() < focal_fraction:
        centre = np.asarray(case.focal[int(rng.integers(len(case.focal)))])
    elif rng.random() < organ_fraction:
        cls = int(rng.integers(1, n_classes))
        idx = np.flatnonzero(case.labels.ravel() == cls)
        if idx.size:
            centre = np.asarray(np.unravel_index(int(rng.choice(idx)), case.labels.shape))
    if centre is None:
        centre = np.asarray([int(rng.integers(0, s)) for s in shape])
    start = np.clip(centre - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, np.maximum(shape - p, 0))
    sl = tuple(slice(int(a), int(a + n)) for a, n in zip(start, p))
    img = np.zeros((case.image.shape[0], *patch), dtype=np.float32)
    lab = np.zeros(patch, dtype=np.int64)
    piece = case.labels[sl]
    inner = tuple(slice(0, n) for n in piece.shape)
    img[(slice(None), *inner)] = case.image[(slice(None), *sl)]
    lab[inner] = piece
    return img, lab


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity jitter: contrast, brightness and noise (no flips: left and right organs differ)."""
    img = img * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.04, 0.04))
    img += rng.normal(0.0, rng.uniform(0.0, 0.02), img.shape).astype(np.float32)
    return img


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of classes 1..n-1 (NaN where a class is in neither)."""
    out = np.full(n_classes - 1, np.nan)
    for c in range(1, n_classes):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        if denom:
            out[c - 1] = 2.0 * (p & t).sum() / denom
    return out


def predict(network: torch.nn.Module, image: np.ndarray, roi_size: Sequence[int]) -> np.ndarray:
    """Argmax classes of a whole network-grid image, with the bundle's sliding-window inferer."""
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=1, overlap=0.25, mode="gaussian",
                                   padding_mode="replicate")
    network.eval()
    device = next(network.parameters()).device
    with torch.inference_mode():
        logits = inferer(torch.from_numpy(image.astype(np.float32))[None].to(device), network)
    return logits[0].cpu().numpy().argmax(0).astype(np.uint8)


def evaluate(network: torch.nn.Module, cases: Sequence[TrainCase], config: SegTrainConfig) -> dict[str, float]:
    """Mean Dice per organ on the network grid over ``cases``."""
    n = len(config.organs) + 1
    scores = np.array([dice_per_class(predict(network, c.image, config.roi_size), c.labels, n) for c in cases])
    return {o: float(np.nanmean(scores[:, i])) for i, o in enumerate(config.organs)}


def load_or_make_cases(config: SegTrainConfig) -> tuple[list[TrainCase], list[TrainCase]]:
    """The training and validation phantoms, cached in the work directory (keyed by what shapes them)."""
    key = {k: config.to_json()[k] for k in ("seed", "train_cases", "val_cases", "spacing", "hu_ranges",
                                            "phantom_spacings", "organs", "balanced_findings")}
    key["case_format"] = 2  # 2: with the focal findings' centres
    path = config.work_dir / "cases.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            return cached["train"], cached["val"]
    prep = bundle_input(config)
    train = [make_case(config, prep, "train", i) for i in range(config.train_cases)]
    val = [make_case(config, prep, "val", i) for i in range(config.val_cases)]
    _save(path, {"key": key, "train": train, "val": val})
    return train, val


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="segmentation", unit="step", disable=not enabled,
                dynamic_ncols=True)


def train_segmentation(
    config: SegTrainConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[int, dict], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train (or resume) and return the network and the last validation Dice per organ."""
    from monai.losses import DiceCELoss

    from ai_core.pipeline import resolve_device

    torch.set_num_threads(max(1, config.threads))
    device = torch.device(resolve_device(config.device))
    config.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = config.work_dir / CHECKPOINT
    torch.manual_seed(config.seed)
    network = build_network(config).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, history = 0, []
    rng = np.random.default_rng(config.seed)
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        # The run's length, checkpoint interval and threads may change on resume; nothing else.
        free = {"steps", "checkpoint_every", "threads", "device"}
        saved, now = json.loads(json.dumps(state["config"])), config.to_json()
        changed = sorted(k for k in saved if k not in free and saved[k] != now.get(k))
        if changed:
            raise ValueError(f"{ckpt_path} was written with other settings ({', '.join(changed)}); "
                             "use another work directory or resume with the same settings")
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), list(state["history"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resuming from step %d of %d", step, config.steps)
    elif config.init_from:
        network.load_state_dict(load_init_weights(config.init_from, network))
        logger.info("starting from the weights in %s", config.init_from)

    t0 = time.perf_counter()
    train, val = load_or_make_cases(config)
    if config.focal_fraction:
        logger.info("cysts or lesions in %d of %d training phantoms",
                    sum(len(c.focal) > 0 for c in train), len(train))
    logger.info("%d + %d phantoms ready in %.0f s", len(train), len(val), time.perf_counter() - t0)

    # Batch Dice: classes absent from one patch do not swamp the loss with empty-mask terms.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    n_classes = len(config.organs) + 1
    dice: dict[str, float] = history[-1]["dice"] if history else {}
    bar = _progress(config.steps, step, progress)
    network.train()
    while step < config.steps:
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))  # cosine decay
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = [sample_patch(train[int(rng.integers(len(train)))], config.patch, rng, n_classes,
                              config.organ_fraction, config.focal_fraction) for _ in range(config.batch_size)]
        x = torch.from_numpy(np.stack([augment(b[0], rng) for b in batch])).to(device)
        y = torch.from_numpy(np.stack([b[1] for b in batch]))[:, None].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            dice = evaluate(network, val, config)
            network.train()
            history.append({"step": step, "loss": float(loss.item()), "dice": dice,
                            "seconds": time.perf_counter() - t0})
            _save(ckpt_path, {"model": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "history": history, "config": config.to_json(),
                              "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
            bar.write(f"step {step}: loss {loss.item():.3f}, val Dice min {min(dice.values()):.3f} "
                      f"({min(dice, key=dice.get)}), mean {np.mean(list(dice.values())):.3f}")
            if on_checkpoint is not None:
                on_checkpoint(step, dice)
    bar.close()
    return network, dice


def export_bundle(config: SegTrainConfig, network: torch.nn.Module, out_dir: Path, *,
                  dice: dict[str, float] | None = None, version: str = "1.0.0",
                  command: str = "", seconds: float | None = None) -> Path:
    """Write the trained network as a MONAI bundle (the demo segmenter when ``out_dir`` is DEMO_BUNDLE)."""
    training = {"config": config.to_json(), "validation_dice": dice or {}, "command": command}
    if seconds is not None:
        training["seconds"] = round(seconds, 1)
    if config.init_from:
        training["initial_weights"] = parent_training(config.init_from)
    return write_bundle(
        out_dir,
        network_def=config.network_def(),
        state_dict={k: v.cpu() for k, v in network.state_dict().items()},  # loads without a GPU
        channel_def=config.channel_def(),
        spacing=config.spacing,
        hu_ranges=config.hu_ranges,
        roi_size=config.roi_size,
        name="ct-vlp demo organ segmentation (phantom-trained)",
        version=version,
        description=("Small 3D UNet trained on the project's synthetic CT phantoms; it segments phantom "
                     "organs, not patients. Not for clinical use."),
        extra_metadata={"training": json.loads(json.dumps(training)), "cleanup": phantom_cleanup(config.organs)},
    )


def phantom_cleanup(organs) -> dict:
    """The clean-up a phantom-trained bundle asks for: fluid notches of the organs that hold cysts.

    A cyst at an organ's surface is the network's hardest case (see
    ai_core.components.fill_fluid_notches); a 12 mm closing spans the phantoms' surface cysts, and
    FLUID_HU holds their water (0-12 HU) blurred by noise and the resampling, not fat or parenchyma.
    """
    from ai_core.components import FLUID_HU
    from ai_core.phantom.findings import FINDINGS

    with_cysts = [o for o in organs if "cyst" in FINDINGS.get(o, ())]
    return {"fluid_notches": {"organs": with_cysts, "radius_mm": 12.0, "hu": list(FLUID_HU)}} if with_cysts else {}


def load_init_weights(path: str | Path, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict at ``path`` (bundle directory, its model.pt, or a training checkpoint), checked against ``network``."""
    path = Path(path)
    if path.is_dir():
        path = path / "models" / "model.pt" if (path / "models" / "model.pt").exists() else path / CHECKPOINT
    if not path.exists():
        raise ValueError(f"--init: {path} does not exist; give a bundle directory, its models/model.pt "
                         "or a training checkpoint.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and "optimizer" in state:
        state = state["model"]  # a training checkpoint
    own = network.state_dict()
    mismatched = sorted(k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape))
    if mismatched or set(state) - set(own):
        raise ValueError(f"--init: the weights in {path} are not for this network (differing: "
                         f"{', '.join(mismatched[:3] or sorted(set(state) - set(own))[:3])}...); use the same "
                         "--channels, --res-units, --spacing, inputs and organs as the model they come from")
    return state


def parent_training(init_from: str | Path) -> dict:
    """What a fine-tuned bundle started from: the path and, for a bundle, its own training record.

    Kept in the new bundle's metadata, so the whole chain of commands that made it stays known.
    """
    path = Path(init_from)
    meta = (path if path.is_dir() else path.parent.parent) / "configs" / "metadata.json"
    record: dict = {"path": str(path)}
    if meta.is_file():
        record["training"] = json.loads(meta.read_text()).get("training", {})
    return record


def held_out_seeds(config: SegTrainConfig, n: int) -> list[int]:
    """Phantom seeds used neither for training nor for validation."""
    return [(config.seed * 1_000_003 + 900_000 + i) & 0x7FFFFFFF for i in range(n)]


def evaluate_end_to_end(
    bundle_dir: Path,
    seeds: Sequence[int],
    *,
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    orientations: Sequence[str] = ("HFS", "FFS", "sagittal", "HFP"),
) -> dict[str, float]:
    """Mean Dice per organ of a bundle through the node's own path (``segment``) on phantoms, on their grid."""
    from ai_core.phantom.generator import generate_case
    from ai_core.segmentation.monai_bundle import MonaiBundleSegmenter
    from ai_core.volume import CTVolume

    seg = MonaiBundleSegmenter(bundle_dir)
    scores: dict[str, list[float]] = {}
    for i, seed in enumerate(seeds):
        case = generate_case(seed, spacing=spacing, orientation=orientations[i % len(orientations)])
        vol = CTVolume(image=case.image, files=[], study_uid=case.study_uid, series_uid=case.series_uid,
                       frame_of_reference_uid=None)
        pred = seg.segment(vol).array()
        truth = sitk.GetArrayViewFromImage(case.labels)
        for organ, value in case.organ_labels.items():
            if organ not in seg.organ_labels:
                continue
            p, t = pred == seg.organ_labels[organ], truth == value
            denom = int(p.sum() + t.sum())
            if denom:
                scores.setdefault(organ, []).append(2.0 * int((p & t).sum()) / denom)
    return {organ: float(np.mean(v)) for organ, v in scores.items()}


def record_evaluation(bundle_dir: Path, key: str, values: dict) -> None:
    """Add an evaluation to the bundle's metadata under ``training``."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta.setdefault("training", {})[key] = values
    path.write_text(json.dumps(meta, indent=2) + "\n")
