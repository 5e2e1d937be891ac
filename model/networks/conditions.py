"""What a network is conditioned on, besides the timestep: class labels (a tensor (B,)) or
text (a ``TextContext``, made by ``TextSkipDiT.encode_text``). A batch's condition is indexed
by rows and concatenated (``cat``) the same way for both."""

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


# Class labels (B,) or text.
Condition = torch.Tensor | TextContext


def cat(conditions: Sequence[Condition]) -> Condition:
    """Rows of every condition in order (all labels, or all text)."""
    if isinstance(conditions[0], TextContext):
        return TextContext.cat([c for c in conditions if isinstance(c, TextContext)])
    return torch.cat([c for c in conditions if isinstance(c, torch.Tensor)])
