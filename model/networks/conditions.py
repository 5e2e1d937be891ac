"""What a network is conditioned on, besides the timestep: class labels (a tensor (B,)), text
(a ``TextContext``, made by ``TextSkipDiT.encode_text``) or Hunyuan-DiT's text (a
``HunyuanContext``, made by ``HunyuanSkipDiT.encode``). A batch's condition is indexed by rows
and concatenated (``cat``) the same way for all three."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TextContext:
    """The text of a batch's rows, ready for every block: per block its cross-attention keys
    and values (B, H, L, Dh) each, the key padding mask (B, L), True on real tokens, and (a
    network with ``pooled_text``) the pooled text (B, D) its timestep embedding adds. Indexing
    picks rows, as on a tensor; ``cat`` joins contexts of different lengths."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, rows: Any) -> TextContext:
        kv = tuple((k[rows], v[rows]) for k, v in self.kv)
        return TextContext(kv, self.mask[rows], None if self.pooled is None else self.pooled[rows])

    def trimmed(self, length: int) -> TextContext:
        """The same rows cut to their first ``length`` tokens."""
        kv = tuple((k[:, :, :length], v[:, :, :length]) for k, v in self.kv)
        return TextContext(kv, self.mask[:, :length], self.pooled)

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def padded(self, length: int) -> TextContext:
        """The same rows with keys and values zero-padded to ``length`` tokens, masked off."""
        pad = length - self.length
        if pad == 0:
            return self
        kv = tuple((F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))) for k, v in self.kv)
        return TextContext(kv, F.pad(self.mask, (0, pad), value=False), self.pooled)

    @staticmethod
    def cat(contexts: Sequence[TextContext]) -> TextContext:
        """Rows of every context in order, padded to the longest."""
        if len(contexts) == 1:
            return contexts[0]
        length = max(c.length for c in contexts)
        padded = [c.padded(length) for c in contexts]
        kv = tuple(
            (torch.cat([p.kv[i][0] for p in padded]), torch.cat([p.kv[i][1] for p in padded]))
            for i in range(len(padded[0].kv))
        )
        pooled = [p.pooled for p in padded]
        joined = None if pooled[0] is None else torch.cat([p for p in pooled if p is not None])
        return TextContext(kv, torch.cat([p.mask for p in padded]), joined)


@dataclass(frozen=True)
class HunyuanContext:
    """A batch's text, ready for every step (``HunyuanSkipDiT.encode``): the tokens every block
    cross-attends to (BERT's, then mT5's projected, padding positions replaced by the model's
    learned padding), the timestep-free part of the adaLN conditioning (pooled mT5, image meta
    size and style through ``extra_embedder``) and the RoPE, shared by the rows. Indexing
    picks rows."""

    text: torch.Tensor  # (B, text_len + text_len_t5, C)
    extra: torch.Tensor  # (B, D)
    rope: tuple[torch.Tensor, torch.Tensor]  # (T, head dim) each

    def __getitem__(self, rows: Any) -> HunyuanContext:
        return HunyuanContext(self.text[rows], self.extra[rows], self.rope)

    def __len__(self) -> int:
        return self.text.shape[0]

    @staticmethod
    def cat(contexts: Sequence[HunyuanContext]) -> HunyuanContext:
        """Rows of every context in order. Rows batched together are latents of one size, so
        they share one RoPE: the first context's."""
        if len(contexts) == 1:
            return contexts[0]
        text = torch.cat([c.text for c in contexts])  # (B, L, C): one length, the model's
        return HunyuanContext(text, torch.cat([c.extra for c in contexts]), contexts[0].rope)


# Class labels (B,), text, or Hunyuan-DiT's text.
Condition = torch.Tensor | TextContext | HunyuanContext


def cat(conditions: Sequence[Condition]) -> Condition:
    """Rows of every condition in order (all labels, all text, or all Hunyuan text)."""
    if isinstance(conditions[0], TextContext):
        return TextContext.cat([c for c in conditions if isinstance(c, TextContext)])
    if isinstance(conditions[0], HunyuanContext):
        return HunyuanContext.cat([c for c in conditions if isinstance(c, HunyuanContext)])
    return torch.cat([c for c in conditions if isinstance(c, torch.Tensor)])
