"""The prompt side of a text model's pipeline: prompts to per-request text contexts.

Requests started together (one engine step's admissions, or ``Pipeline.generate``'s list)
have every prompt and negative prompt encoded in one batch, through the embedding LRU
(``model.text.cache``: repeats and the empty prompt are not encoded again). The network then
projects each request's text into every block's cross-attention keys and values once
(``TextSkipDiT.encode_text``); its steps, full and cached, reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.networks.conditions import TextContext
from model.networks.text_dit import TextSkipDiT
from model.sampling.plan import RunPlan
from model.text.cache import UNCONDITIONAL, EmbeddingCache, Entry, stack
from model.text.encoder import TextEncoder

DEFAULT_CACHE_ENTRIES = 1024


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

    prompt: TextContext
    negative: TextContext
    report: PromptReport

    def rows(self, n: int, guided: bool) -> TextContext:
        """The context of a job's rows: n conditional rows, then (guided) n unconditional."""
        both = TextContext.cat([self.prompt, self.negative])  # 2 rows
        index = [0] * n + ([1] * n if guided else [])
        return both[torch.tensor(index, device=both.mask.device)]


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


def _trim(context: TextContext) -> TextContext:
    """One row cut to its real tokens: a request's context does not depend on its company."""
    return context.trimmed(int(context.mask[0].sum()))


def _report(pair: Sequence[Entry]) -> PromptReport:
    prompt, negative = pair
    return PromptReport(prompt.tokens, prompt.truncated, negative.tokens, negative.truncated)
