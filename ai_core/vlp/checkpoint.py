"""Checkpoints: the project's own format, and fVLM reference checkpoints.

Own format (one ``torch.save`` file, loadable with ``weights_only=True``)::

    {"format": "ct-vlp-checkpoint", "format_version": 1,
     "spec": ModelSpec as JSON (sizes, organs, finding dictionary, calibrated thresholds),
     "spec_hash": str,
     "state_dict": weights (a frozen text tower from a pip package is left out and
                   reloaded from the package; "text_fingerprint" checks it is the same one),
     "text_fingerprint": str | None,
     "training": optional resume state (optimizer, step, RNG...)}

fVLM reference checkpoints are ``{'model': state_dict, ...}`` of its BlipPretrain model; our
parameter names are the reference ones, so mapping is by name, with a report of missing and
unexpected keys and a refusal on mismatch unless ``strict=False``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ai_core.vlp.model import OrganVLP, build_model
from ai_core.vlp.spec import ModelSpec, fvlm_ctrate_spec

log = logging.getLogger(__name__)

FORMAT = "ct-vlp-checkpoint"
FORMAT_VERSION = 1

# In some released fVLM checkpoints (a BERT config flag); the forward pass never uses it.
FVLM_HARMLESS_UNEXPECTED = frozenset({"text_encoder.embeddings.token_type_embeddings.weight"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file, the problem and the fix."""


@dataclass
class LoadReport:
    """How a checkpoint's entries met the model's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    harmless_unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model entry was found with its shape and nothing unknown was left over."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def describe(self) -> str:
        """One readable paragraph for logs and errors."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {', '.join(self.missing[:3])})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {', '.join(self.unexpected[:3])})")
        if self.shape_mismatch:
            k, a, b = self.shape_mismatch[0]
            parts.append(f"{len(self.shape_mismatch)} with other shapes (e.g. {k}: checkpoint {a}, model {b})")
        if self.harmless_unexpected:
            parts.append(f"ignored harmless {', '.join(self.harmless_unexpected)}")
        return "; ".join(parts) or "all entries match"


def compare_state_dicts(model_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor]) -> LoadReport:
    """Missing, unexpected (harmless ones apart) and shape-mismatched entries."""
    report = LoadReport()
    for key, value in model_state.items():
        if key not in ckpt_state:
            report.missing.append(key)
        elif tuple(ckpt_state[key].shape) != tuple(value.shape):
            report.shape_mismatch.append((key, tuple(ckpt_state[key].shape), tuple(value.shape)))
    for key in ckpt_state:
        if key not in model_state:
            (report.harmless_unexpected if key in FVLM_HARMLESS_UNEXPECTED else report.unexpected).append(key)
    return report


def text_fingerprint(model: OrganVLP) -> str:
    """SHA-256 (16 hex digits) over the text tower's weights, to recognise the same pre-trained tower."""
    h = hashlib.sha256()
    for key, value in sorted(model.text_encoder.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _text_stored(spec: ModelSpec) -> bool:
    # A frozen tower that a pip package ships is not ours to redistribute (nor to count in size).
    return not (spec.text.freeze and spec.text.source.startswith("package:"))


def save_checkpoint(path: str | Path, model: OrganVLP, training: dict[str, Any] | None = None) -> Path:
    """Write a model (and optional training state) in the project's format, atomically."""
    path = Path(path)
    spec = model.spec
    state = model.state_dict()
    fingerprint = None
    if not _text_stored(spec):
        state = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
        fingerprint = text_fingerprint(model)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.spec_hash(),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "text_fingerprint": fingerprint,
    }
    if training is not None:
        payload["training"] = training
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw content of a project checkpoint, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one (`dicom-node train vlp`) or fix the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}); re-save it with this version") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a {FORMAT} file; an fVLM reference checkpoint loads with load_fvlm_checkpoint"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {payload['format_version']}, this code reads up to {FORMAT_VERSION}; "
            "upgrade the package"
        )
    return payload


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", spec_override: ModelSpec | None = None
) -> tuple[OrganVLP, dict[str, Any]]:
    """A model from a project checkpoint (strict: every entry must match) and the raw payload.

    ``spec_override`` may change prompts and thresholds (e.g. findings added from config), never sizes.
    """
    payload = read_checkpoint(path)
    spec = ModelSpec.model_validate(payload["spec"])
    if spec_override is not None:
        _check_same_architecture(spec, spec_override, path)
        spec = spec_override
    model = build_model(spec)
    state = payload["state_dict"]
    expected = model.state_dict()
    if not _text_stored(spec):
        expected = {k: v for k, v in expected.items() if not k.startswith("text_encoder.")}
        if payload.get("text_fingerprint") and payload["text_fingerprint"] != text_fingerprint(model):
            raise CheckpointError(
                f"{path} was trained with another version of the text encoder {spec.text.source}; "
                "install the version it was trained with or retrain"
            )
    report = compare_state_dicts(expected, state)
    if not report.ok or report.harmless_unexpected:
        raise CheckpointError(f"{path} does not fit its own spec: {report.describe()}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), payload


def init_from_checkpoint(model: OrganVLP, path: str | Path) -> list[str]:
    """Load an earlier model's weights into ``model`` to fine-tune it; returns the widened entries.

    The spec may differ from the checkpoint's only by more encoder input channels
    (``vision.relative_channel``, ``vision.lesion_scales_mm``, ``vision.relative_extra_scales_hu``,
    appended after the channels the checkpoint knows): the first convolutions get zero weights for the new
    channels, so the model starts out computing exactly what the earlier one did; and by
    ``vision.focal_floor_hu``, which changes where the focal minimum is taken, not the weights.
    """
    payload = read_checkpoint(path)
    old = ModelSpec.model_validate(payload["spec"])
    new = model.spec
    keys = ("organs", "embed_dim", "pooling", "text")
    ignore = {"relative_channel", "relative_scale_hu", "lesion_scales_mm", "relative_extra_scales_hu",
              "focal_floor_hu"}
    if (old.model_dump(include=set(keys)) != new.model_dump(include=set(keys))
            or old.vision.model_dump(exclude=ignore) != new.vision.model_dump(exclude=ignore)):
        raise CheckpointError(f"{path} is another architecture than the model to fine-tune; only input "
                              "channels may be added (vision.relative_channel, vision.lesion_scales_mm, "
                              "vision.relative_extra_scales_hu) and vision.focal_floor_hu changed")
    ov, nv = old.vision, new.vision
    # New channels are appended after the old ones: the old ones must keep their places.
    relative_lost = ov.relative_channel and (not nv.relative_channel or nv.relative_scale_hu != ov.relative_scale_hu)
    # The extra relative scales come last, so lesion scales can no longer be added after them.
    lesion_moved = (nv.lesion_scales_mm[:len(ov.lesion_scales_mm)] != ov.lesion_scales_mm
                    or (ov.relative_extra_scales_hu and nv.lesion_scales_mm != ov.lesion_scales_mm))
    extra_moved = nv.relative_extra_scales_hu[:len(ov.relative_extra_scales_hu)] != ov.relative_extra_scales_hu
    if relative_lost or lesion_moved or extra_moved:
        raise CheckpointError(f"{path} has input channels that the model to fine-tune drops, changes or reorders "
                              f"(relative_channel {ov.relative_channel}, relative_scale_hu {ov.relative_scale_hu}, "
                              f"lesion_scales_mm {list(ov.lesion_scales_mm)}, relative_extra_scales_hu "
                              f"{list(ov.relative_extra_scales_hu)}); channels may only be added after them")
    state = dict(payload["state_dict"])
    own = model.state_dict()
    widened = []
    extra = new.vision.encoder_channels - old.vision.encoder_channels
    for k, v in state.items():
        target = own.get(k)
        if target is None or target.shape == v.shape:
            continue
        if extra > 0 and v.dim() >= 2 and v.shape[0] == target.shape[0] and v.shape[1] + extra == target.shape[1] \
                and v.shape[2:] == target.shape[2:]:
            state[k] = torch.cat([v, v.new_zeros((v.shape[0], extra, *v.shape[2:]))], dim=1)
            widened.append(k)
        else:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model {tuple(target.shape)}")
    expected = own if _text_stored(new) else {k: v for k, v in own.items() if not k.startswith("text_encoder.")}
    report = compare_state_dicts(expected, state)
    if not report.ok:
        raise CheckpointError(f"{path} does not fit the model to fine-tune: {report.describe()}")
    model.load_state_dict(state, strict=False)
    return widened


def _check_same_architecture(a: ModelSpec, b: ModelSpec, path: str | Path) -> None:
    keys = ("organs", "embed_dim", "vision", "pooling", "text")
    da, db = a.model_dump(include=set(keys)), b.model_dump(include=set(keys))
    if da != db:
        changed = [k for k in keys if da[k] != db[k]]
        raise CheckpointError(f"the spec given for {path} changes its architecture ({', '.join(changed)})")


# -- fVLM reference checkpoints ------------------------------------------------------------------


def map_fvlm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference names -> ours: identical by design, minus DDP's ``module.`` and a BERT ``bert.`` level."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("text_encoder.bert."):
            key = "text_encoder." + key[len("text_encoder.bert.") :]
        out[key] = value
    return out


def read_fvlm_state_dict(source: str | Path | dict[str, Any], allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The ``model`` state_dict of an fVLM checkpoint file (or of an already loaded dict)."""
    if isinstance(source, dict):
        payload = source
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"no fVLM checkpoint at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except Exception as e:
            raise CheckpointError(
                f"{path} cannot be read with weights_only=True ({type(e).__name__}); checkpoints written by "
                "torch 2.3 hold pickled config objects: if you trust the file, load it with allow_pickle=True "
                "(--allow-pickle)"
            ) from e
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("fVLM checkpoint has no 'model' state_dict of tensors")
    return map_fvlm_names(state)


def load_fvlm_checkpoint(
    source: str | Path | dict[str, Any],
    spec: ModelSpec | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> tuple[OrganVLP, LoadReport]:
    """Our model holding an fVLM reference checkpoint's weights, and the load report.

    Refuses (``CheckpointError``) when entries are missing, unexpected (other than the harmless
    token-type embeddings) or shaped differently, unless ``strict=False``.
    """
    spec = spec or fvlm_ctrate_spec()
    state = read_fvlm_state_dict(source, allow_pickle=allow_pickle)
    with torch.device("meta"):
        skeleton = build_model(spec, load_text_weights=False)
    report = compare_state_dicts(skeleton.state_dict(), state)
    if not report.ok:
        msg = f"fVLM checkpoint does not fit the spec {spec.name!r}: {report.describe()}"
        if strict:
            raise CheckpointError(msg + "; fix the spec (organs, sizes) or pass strict=False / --force")
        log.warning(msg)
    wanted = skeleton.state_dict()
    mismatched = {m[0] for m in report.shape_mismatch}
    usable = {
        k: (v.to(wanted[k].dtype) if v.is_floating_point() else v)
        for k, v in state.items()
        if k in wanted and k not in mismatched
    }
    if report.missing or report.shape_mismatch:
        # Entries the checkpoint does not provide keep a real random initialisation.
        model = build_model(spec, load_text_weights=False)
        model.load_state_dict(usable, strict=False)
    else:
        model = skeleton
        model.load_state_dict(usable, strict=True, assign=True)
        _materialise_non_persistent(model)
    _retie_text_decoder(model, state)
    log.info("fVLM checkpoint loaded: %s", report.describe())
    return model.eval(), report


def _retie_text_decoder(model: OrganVLP, state: dict[str, torch.Tensor]) -> None:
    # The reference ties the MLM decoder to the word embeddings; loading by name unties them.
    if not hasattr(model.text_encoder, "tie_decoder"):
        return
    dec, emb = "text_encoder.cls.predictions.decoder.weight", "text_encoder.embeddings.word_embeddings.weight"
    if dec in state and emb in state and not torch.equal(state[dec], state[emb]):
        log.warning("fVLM checkpoint: MLM decoder and word embeddings differ; tying them to the embeddings")
    model.text_encoder.tie_decoder()


def _materialise_non_persistent(model: OrganVLP) -> None:
    # Non-persistent buffers (e.g. BERT's token_type_ids) are not in any state_dict: rebuild them.
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "token_type_ids":
                    module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
                else:
                    raise CheckpointError(f"buffer {name} of {type(module).__name__} was not provided")
