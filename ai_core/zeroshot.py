"""Zero-shot findings: an organ embedding against the prompt pair of each of its findings.

probability(finding) = softmax([image . negative, image . positive] / temp)[positive], as in the
fVLM reference evaluation; the decision compares it with the finding's calibrated threshold.
The finding dictionary (prompt pairs per organ) lives in the model spec and can be extended or
overridden from config, with no code::

    findings:
      liver:
        lesion: {negative: "No focal liver lesion.", positive: "Focal hypodense liver lesion.", threshold: 0.6}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ai_core.result import FindingResult, ModelInfo
from ai_core.vlp.model import OrganVLP
from ai_core.vlp.spec import FindingSpec, ModelSpec

log = logging.getLogger(__name__)


def extend_findings(spec: ModelSpec, config: Mapping[str, Mapping[str, Mapping[str, Any]]] | None) -> ModelSpec:
    """The spec with findings (prompt pairs, thresholds) added or replaced from a config mapping."""
    if not config:
        return spec
    findings = {organ: list(items) for organ, items in spec.findings.items()}
    thresholds = dict(spec.thresholds)
    for organ, entries in config.items():
        if organ not in spec.organs:
            raise ValueError(
                f"findings config names organ {organ!r}, which model {spec.name!r} does not have; "
                f"use one of {', '.join(spec.organs)}"
            )
        for key, entry in entries.items():
            unknown = set(entry) - {"negative", "positive", "threshold"}
            if unknown or not {"negative", "positive"} <= set(entry):
                raise ValueError(
                    f"findings.{organ}.{key} needs 'negative' and 'positive' prompts (and optionally "
                    f"'threshold'); got keys {sorted(entry)}"
                )
            new = FindingSpec(key=key, negative=str(entry["negative"]), positive=str(entry["positive"]))
            items = findings.setdefault(organ, [])
            items[:] = [f for f in items if f.key != key] + [new]
            if "threshold" in entry:
                t = float(entry["threshold"])
                if not 0.0 <= t <= 1.0:
                    raise ValueError(f"findings.{organ}.{key}.threshold must be in 0..1, got {t}")
                thresholds[f"{organ}/{key}"] = t
    return spec.with_updates(findings={o: tuple(f) for o, f in findings.items()}, thresholds=thresholds)


class ZeroShotScorer:
    """Scores organ embeddings against the finding dictionary of one model; text embeddings cached."""

    def __init__(self, model: OrganVLP) -> None:
        self.model = model
        self.spec = model.spec
        self._text: dict[str, torch.Tensor] = {}

    @property
    def model_info(self) -> ModelInfo:
        """Name, version and spec hash for the outputs to cite."""
        return ModelInfo(self.spec.name, self.spec.version, self.spec.spec_hash(), demo=self.spec.demo)

    @torch.no_grad()
    def text_embeddings(self, organ: str) -> torch.Tensor:
        """Prompt embeddings of an organ's findings, (F, 2, E) as [negative, positive]; computed once."""
        if not self._text:
            prompts = [(o, f) for o, items in self.spec.findings.items() for f in items]
            if prompts:
                texts = [t for _, f in prompts for t in (f.negative, f.positive)]
                emb = self.model.encode_texts(texts).reshape(len(prompts), 2, -1)
                for organ_key in self.spec.findings:
                    rows = [i for i, (o, _) in enumerate(prompts) if o == organ_key]
                    self._text[organ_key] = emb[rows]
            log.debug("prompt embeddings computed for %d findings", len(prompts))
        return self._text.get(organ, torch.empty(0, 2, self.spec.embed_dim))

    @torch.no_grad()
    def probabilities(self, organ: str, image_embed: torch.Tensor) -> dict[str, float]:
        """Probability of each finding of an organ from its normalised embedding (E,)."""
        text = self.text_embeddings(organ)
        image_embed = image_embed.to(text.device, text.dtype)
        logits = torch.einsum("e,fke->fk", image_embed, text) / self.model.temp
        probs = logits.softmax(-1)[:, 1]
        return {f.key: float(p) for f, p in zip(self.spec.findings.get(organ, ()), probs)}

    def score_organ(
        self,
        organ: str,
        image_embed: torch.Tensor | None,
        reason: str | None = None,
        point_lps: tuple[float, float, float] | None = None,
    ) -> list[FindingResult]:
        """Decisions for every finding of one organ; ``None`` embedding -> ``not evaluated`` with reason."""
        findings = self.spec.findings.get(organ, ())
        if image_embed is None:
            why = reason or "organ not evaluated"
            return [
                FindingResult(organ, f.key, "not evaluated", threshold=self.spec.threshold(organ, f.key), reason=why)
                for f in findings
            ]
        probs = self.probabilities(organ, image_embed)
        out = []
        for f in findings:
            t = self.spec.threshold(organ, f.key)
            p = probs[f.key]
            out.append(FindingResult(organ, f.key, "present" if p >= t else "absent", p, t, None, point_lps))
        return out

    def score(
        self,
        embeddings: Mapping[str, torch.Tensor | None],
        reasons: Mapping[str, str] | None = None,
        points: Mapping[str, tuple[float, float, float]] | None = None,
    ) -> list[FindingResult]:
        """Decisions for every organ of the dictionary; organs without an embedding are not evaluated."""
        reasons, points = reasons or {}, points or {}
        results: list[FindingResult] = []
        for organ in self.spec.findings:
            emb = embeddings.get(organ)
            why = reasons.get(organ) or ("organ not found in the segmentation" if emb is None else None)
            results += self.score_organ(organ, emb, why, points.get(organ))
        return results
