"""The prompt side of a text model's pipeline: prompts to per-request text contexts.

Requests started together (one engine step's admissions, or ``Pipeline.generate``'s list)
have every prompt and negative prompt encoded in one batch, through the embedding LRU
(``model.text.cache``: repeats and the empty prompt are not encoded again). The network then
projects each request's text into every block's cross-attention keys and values once
(``TextSkipDiT.encode_text``); its steps, full and cached, reuse them.

Hunyuan-DiT (``HunyuanPrompting``) has two encoders, BERT and mT5, each padded to its fixed
length as diffusers' ``HunyuanDiTPipeline.encode_prompt`` pads them; the network turns a
request's prompt and negative prompt, with the image meta size, style and RoPE the pipeline
gives, into a ``HunyuanContext`` once (``HunyuanSkipDiT.encode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.networks import conditions
from model.networks.conditions import HunyuanContext, TextContext
from model.networks.hunyuan import HunyuanPrompt, HunyuanSkipDiT, rotary_embedding
from model.networks.text_dit import TextSkipDiT
from model.sampling.plan import RunPlan
from model.text.cache import UNCONDITIONAL, EmbeddingCache, Entry, stack
from model.text.encoder import TextEncoder

DEFAULT_CACHE_ENTRIES = 1024
# What HunyuanDiTPipeline conditions on besides the text: the original image size it defaults
# to (its ``original_size``), a crop at the top-left corner, style 0.
HUNYUAN_ORIGINAL_SIZE = (1024, 1024)
HUNYUAN_CROP_TOP_LEFT = (0, 0)
VAE_DOWNSCALE = 8  # latents per pixel side of Hunyuan-DiT's VAE


@dataclass(frozen=True)
class PromptReport:
    """What became of a request's prompts: tokens used (special tokens included) and whether
    the encoder's limit cut them."""

    tokens: int
    truncated: bool
    negative_tokens: int
    negative_truncated: bool


@dataclass(frozen=True)
class RequestText:
    """One request's text, ready for its steps: the prompt's context (1 row), the negative
    prompt's (1 row; the empty prompt's where none is given), and the report."""

    prompt: TextContext | HunyuanContext
    negative: TextContext | HunyuanContext
    report: PromptReport

    def rows(self, n: int, guided: bool) -> TextContext | HunyuanContext:
        """The context of a job's rows: n conditional rows, then (guided) n unconditional."""
        both = conditions.cat([self.prompt, self.negative])  # 2 rows
        assert not isinstance(both, torch.Tensor), "a request's text is a text context"
        device = both.mask.device if isinstance(both, TextContext) else both.text.device
        index = [0] * n + ([1] * n if guided else [])
        return both[torch.tensor(index, device=device)]


class Prompting:
    """A text model's encoder, the name its embeddings are cached under, and the cache (one
    per worker, shared by its models: keys hold the model name)."""

    def __init__(self, encoder: TextEncoder, name: str, cache: EmbeddingCache | None = None):
        self.encoder = encoder.eval()
        self.name = name
        self.cache = cache if cache is not None else EmbeddingCache(DEFAULT_CACHE_ENTRIES)

    @property
    def max_tokens(self) -> int:
        return self.encoder.max_tokens

    @torch.inference_mode()
    def texts(self, model: TextSkipDiT, plans: Sequence[RunPlan]) -> list[RequestText]:
        """Each plan's text: its prompts encoded in one batch (cache misses only), then each
        request's keys and values computed once, trimmed to its own longest prompt."""
        prompts: list[str] = []
        for plan in plans:
            assert plan.prompt is not None, "plans of a text model hold a prompt"
            prompts += [plan.prompt, plan.negative_prompt or UNCONDITIONAL]
        entries = self.cache.encode_cached(self.encoder, self.name, prompts)
        device = model.x_embedder.proj.weight.device
        out = []
        for i in range(len(plans)):
            pair = entries[2 * i : 2 * i + 2]
            hidden, mask = stack(pair)  # (2, L, C_text), (2, L)
            context = model.encode_text(hidden.to(device), mask.to(device))
            out.append(RequestText(_trim(context[0:1]), _trim(context[1:2]), _report(pair)))
        return out


class HunyuanPrompting:
    """Hunyuan-DiT's two encoders (BERT, then mT5: ``fixed_length``, padded to the model's
    ``text_len`` and ``text_len_t5``), the name their embeddings are cached under (one key
    space per encoder) and the cache, shared with the worker's other models.

    A request's report counts BERT's tokens (``max_tokens`` is BERT's length, the shorter);
    it is truncated where either encoder cut it."""

    def __init__(
        self,
        bert: TextEncoder,
        t5: TextEncoder,
        name: str,
        cache: EmbeddingCache | None = None,
    ):
        if not (bert.fixed_length and t5.fixed_length):
            raise ValueError("Hunyuan-DiT's encoders pad to their fixed lengths (fixed_length)")
        self.encoders = (bert.eval(), t5.eval())
        self.name = name
        self.cache = cache if cache is not None else EmbeddingCache(DEFAULT_CACHE_ENTRIES)
        # RoPE per (latent side, device): the same for every request, computed once
        self._ropes: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def max_tokens(self) -> int:
        return self.encoders[0].max_tokens

    @torch.inference_mode()
    def texts(self, model: HunyuanSkipDiT, plans: Sequence[RunPlan]) -> list[RequestText]:
        """Each plan's text: its prompts through both encoders in one batch each (cache misses
        only), then each request's prompt and negative prompt encoded by the network, on their
        own (a request's context does not depend on its company)."""
        prompts: list[str] = []
        for plan in plans:
            assert plan.prompt is not None, "plans of a text model hold a prompt"
            prompts += [plan.prompt, plan.negative_prompt or UNCONDITIONAL]
        bert, t5 = (
            self.cache.encode_cached(encoder, f"{self.name}#{i}", prompts)
            for i, encoder in enumerate(self.encoders)
        )
        device = model.transformer.pos_embed.proj.weight.device
        dtype = model.transformer.pos_embed.proj.weight.dtype
        side = model.config.input_size
        meta = None
        if model.config.style_and_meta_size:
            size = HUNYUAN_ORIGINAL_SIZE + (side * VAE_DOWNSCALE,) * 2 + HUNYUAN_CROP_TOP_LEFT
            meta = torch.tensor([size, size], dtype=dtype, device=device)  # (2, 6)
        style = torch.zeros(2, dtype=torch.long, device=device) if meta is not None else None
        if (side, device) not in self._ropes:
            self._ropes[side, device] = rotary_embedding(model.config, side, side, device)
        rope = self._ropes[side, device]
        out = []
        for i in range(len(plans)):
            pair = slice(2 * i, 2 * i + 2)  # the prompt, then the negative prompt
            hidden, mask = _fixed(bert[pair], device, dtype)  # (2, text_len, C), (2, text_len)
            hidden_t5, mask_t5 = _fixed(t5[pair], device, dtype)  # (2, text_len_t5, C_t5), ..
            prompt = HunyuanPrompt(hidden, mask, hidden_t5, mask_t5, rope, meta, style)
            context = model.encode(prompt)  # 2 rows
            report = PromptReport(
                bert[2 * i].tokens,
                bert[2 * i].truncated or t5[2 * i].truncated,
                bert[2 * i + 1].tokens,
                bert[2 * i + 1].truncated or t5[2 * i + 1].truncated,
            )
            out.append(RequestText(context[0:1], context[1:2], report))
        return out


def _fixed(
    entries: Sequence[Entry], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-length entries as a batch: hidden (n, L, C) and mask (n, L) int64, 1 on the real
    tokens (the first ``tokens`` of each: padding is on the right)."""
    hidden = torch.stack([e.hidden for e in entries]).to(device, dtype)  # (n, L, C)
    positions = torch.arange(hidden.shape[1], device=device)  # (L,)
    used = torch.tensor([e.tokens for e in entries], device=device)  # (n,)
    return hidden, (positions[None, :] < used[:, None]).long()


def _trim(context: TextContext) -> TextContext:
    """One row cut to its real tokens: a request's context does not depend on its company."""
    return context.trimmed(int(context.mask[0].sum()))


def _report(pair: Sequence[Entry]) -> PromptReport:
    prompt, negative = pair
    return PromptReport(prompt.tokens, prompt.truncated, negative.tokens, negative.truncated)
