"""The text encoder of a text-to-image model: a tokenizer and a T5, mT5, CLIP or BERT text
encoder, loaded from local directories only (never a download, never the hub cache), or put
together from objects in memory (training builds one and trains it with the diffusion model).

``encode`` tokenizes a batch of prompts once, padded to the longest (``fixed_length``: to
``max_tokens``, as Hunyuan-DiT's pipeline pads both its encoders) and cut at ``max_tokens``,
runs the encoder once and reports per prompt the tokens it used and whether it was cut. A prompt
is cut iff its full tokenization, special tokens included, is longer than ``max_tokens``: counted,
not guessed from the padded batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:  # transformers' model classes take seconds to import: only when loading
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# The saved config's ``model_type`` -> the ``transformers`` class that loads the encoder.
ENCODERS: dict[str, str] = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",  # Hunyuan-DiT's second encoder
    "clip_text_model": "CLIPTextModel",
    "bert": "BertModel",  # Hunyuan-DiT's bilingual CLIP-style BERT
}
# A tokenizer directory holds at least one of these. Without one, AutoTokenizer builds the model
# type's tokenizer with an empty vocabulary from a bare config.json: every word unknown, no error.
VOCAB_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json", "vocab.txt")

T = TypeVar("T")


class TextEncoderError(ValueError):
    """A text encoder or tokenizer cannot be loaded; the message names the directory and why."""


@dataclass(frozen=True)
class Encoded:
    """A batch of encoded prompts, in the order given."""

    hidden: torch.Tensor  # (n, L, D) float; L = the longest prompt's tokens (or max_tokens)
    mask: torch.Tensor  # (n, L) bool, True on a real token (padding is on the right)
    tokens: list[int]  # per prompt: tokens used, special tokens included (<= max_tokens)
    truncated: list[bool]  # per prompt: its full tokenization was longer than max_tokens


class TextEncoder(nn.Module):
    """A tokenizer and an encoder model whose last hidden states condition the diffusion model.

    Holds no request state. In eval mode ``encode`` runs under ``torch.inference_mode()``; in
    training mode (and through ``tokenize`` + ``forward``) the encoder is differentiable.
    ``fixed_length``: every prompt is padded to ``max_tokens`` and the encoder runs over the
    padding too (a model that reads the padded positions' states: Hunyuan-DiT pools its mT5
    tokens without a mask). ``with_embeddings``: the encoder's input token embeddings follow
    its last hidden states on the feature axis (a network whose ``text_values`` is
    "embeddings").
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        max_tokens: int,
        fixed_length: bool = False,
        with_embeddings: bool = False,
    ):
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        # Learnt positions (CLIP) end at max_position_embeddings; T5's relative ones do not end.
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_tokens > positions:
            raise ValueError(
                f"max_tokens {max_tokens} exceeds the encoder's {positions} position embeddings"
            )
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens = max_tokens
        self.fixed_length = fixed_length
        self.with_embeddings = with_embeddings

    @classmethod
    def load(
        cls,
        encoder_dir: Path,
        tokenizer_dir: Path,
        max_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        fixed_length: bool = False,
        with_embeddings: bool = False,
    ) -> TextEncoder:
        """Load from local directories (``save_pretrained`` layout), in eval mode on ``device``.
        The encoder class is chosen by the saved config's ``model_type`` (``ENCODERS``). Raises
        TextEncoderError naming the directory for a missing directory or file, or an unsupported
        model type. (T5 overflows in float16; bfloat16 is its half precision.)"""
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        encoder_dir, tokenizer_dir = Path(encoder_dir), Path(tokenizer_dir)
        config: PretrainedConfig = _load_local(
            AutoConfig.from_pretrained, encoder_dir, "encoder config"
        )
        if config.model_type not in ENCODERS:
            raise TextEncoderError(
                f"encoder in {encoder_dir} has model_type {config.model_type!r}; "
                f"supported: {sorted(ENCODERS)}"
            )
        if not any((tokenizer_dir / name).is_file() for name in VOCAB_FILES):
            raise TextEncoderError(
                f"tokenizer directory {tokenizer_dir} holds none of the vocabulary files "
                f"{list(VOCAB_FILES)}"
            )
        tokenizer = _load_local(AutoTokenizer.from_pretrained, tokenizer_dir, "tokenizer")
        encoder_cls: type[PreTrainedModel] = getattr(transformers, ENCODERS[config.model_type])
        model = _load_local(encoder_cls.from_pretrained, encoder_dir, "encoder", config=config)
        encoder = cls(tokenizer, model, max_tokens, fixed_length, with_embeddings)
        return encoder.to(device=device, dtype=dtype).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (n, L) int64 and attention mask (n, L) int64, 1 on a real token, on the
        encoder's device: padded to the longest prompt (``fixed_length``: to ``max_tokens``),
        each cut at ``max_tokens`` (the tokenizer keeps its special tokens when it cuts)."""
        batch = self.tokenizer(
            list(prompts),
            padding="max_length" if self.fixed_length else "longest",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (n, L, D), with ``with_embeddings`` the input token embeddings
        beside them (n, L, 2D); padded positions are masked out of attention."""
        return encoder_states(self.model, input_ids, attention_mask, self.with_embeddings)

    def encode(self, prompts: Sequence[str]) -> Encoded:
        """Encode ``prompts`` in one tokenizer call and one encoder forward."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        input_ids, attention_mask = self.tokenize(prompts)  # (n, L), (n, L)
        tokens = attention_mask.sum(dim=1).tolist()
        for prompt, used in zip(prompts, tokens, strict=True):
            if used == 0:
                raise ValueError(f"the tokenizer gives no tokens for prompt {prompt!r}")
        # Full lengths, special tokens included; verbose=False: an over-long prompt is expected.
        full = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        grad = contextlib.nullcontext() if self.training else torch.inference_mode()
        with grad:
            hidden = self(input_ids, attention_mask)  # (n, L, D)
        return Encoded(
            hidden=hidden,
            mask=attention_mask.bool(),
            tokens=tokens,
            truncated=[n > self.max_tokens for n in full],
        )


def encoder_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    with_embeddings: bool = False,
) -> torch.Tensor:
    """``model``'s last hidden states (n, L, D) for the tokens; ``with_embeddings``: followed on
    the feature axis by the input token embeddings (n, L, 2D), each word's own vector (the
    embedding table's rows, without the encoder's context)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if not with_embeddings:
        return hidden
    embeddings = model.get_input_embeddings()(input_ids)  # (n, L, D)
    return torch.cat([hidden, embeddings.to(hidden.dtype)], dim=-1)


def _load_local(load: Callable[..., T], directory: Path, what: str, **kwargs: Any) -> T:
    """``load(directory, local_files_only=True)``, its errors re-raised naming ``directory``."""
    if not directory.is_dir():
        raise TextEncoderError(f"{what} directory {directory} does not exist")
    try:
        return load(directory, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise TextEncoderError(f"cannot load the {what} from {directory}: {err}") from err
