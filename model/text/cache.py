"""An LRU of prompt embeddings, keyed by (model name, prompt).

Served prompts repeat (a client's retries, the same prompt at several seeds), and every guided
request needs the empty prompt of the unconditional branch: that one is pinned, encoded once per
model and never evicted. The misses of a batch are encoded in one ``encode`` call, a prompt given
twice in it once. A model name must stand for fixed weights: the cache cannot see a change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from model.text.encoder import Encoded, TextEncoder

UNCONDITIONAL = ""  # the prompt of guidance's unconditional branch: pinned


@dataclass(frozen=True)
class Entry:
    """One prompt's embedding."""

    # (L, D): its real tokens only, no padding; a ``fixed_length`` encoder's: all max_tokens
    # positions, its real tokens first (the model reads the padded positions' states too)
    hidden: torch.Tensor
    tokens: int  # tokens used, special tokens included (L without padding)
    truncated: bool  # the prompt was cut at the encoder's max_tokens


class EmbeddingCache:
    """LRU of up to ``capacity`` entries, plus one pinned empty-prompt entry per model.

    ``hits`` counts the prompts served without encoding (a repeat within one batch included),
    ``misses`` those encoded. A lock guards the entries and counters; the encoder runs outside it.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._lru: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # least recent first
        self._pinned: dict[tuple[str, str], Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru) + len(self._pinned)

    def __contains__(self, key: object) -> bool:
        """Whether ``(model_name, prompt)`` is held; does not count as a use."""
        with self._lock:
            return key in self._lru or key in self._pinned

    def encode_cached(
        self, encoder: TextEncoder, model_name: str, prompts: Sequence[str]
    ) -> list[Entry]:
        """The entries of ``prompts`` (in order) for ``encoder``, known as ``model_name``: held
        ones from the cache, the others from one ``encoder.encode`` call, then held."""
        if encoder.training:
            raise ValueError("the cache holds fixed embeddings; the encoder is in training mode")
        distinct = list(dict.fromkeys(prompts))
        with self._lock:
            found = {p: e for p in distinct if (e := self._use((model_name, p))) is not None}
            missing = [p for p in distinct if p not in found]
            self.misses += len(missing)
            self.hits += len(prompts) - len(missing)
        if missing:
            entries = _entries(encoder.encode(missing), encoder.fixed_length)
            encoded = dict(zip(missing, entries, strict=True))
            with self._lock:
                for prompt, entry in encoded.items():
                    self._hold((model_name, prompt), entry)
            found |= encoded
        return [found[p] for p in prompts]

    def _use(self, key: tuple[str, str]) -> Entry | None:
        if key in self._pinned:
            return self._pinned[key]
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        return None

    def _hold(self, key: tuple[str, str], entry: Entry) -> None:
        if key[1] == UNCONDITIONAL:
            self._pinned[key] = entry
            return
        self._lru[key] = entry
        self._lru.move_to_end(key)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)


def _entries(encoded: Encoded, fixed_length: bool = False) -> list[Entry]:
    """One entry per prompt: its rows of the batch without the padding (``fixed_length``: with
    it), a copy, so an entry does not keep the whole batch alive."""
    hidden, mask = encoded.hidden, encoded.mask  # (n, L, D), (n, L)
    return [
        Entry(
            hidden=hidden[i].clone() if fixed_length else hidden[i, mask[i]],  # (L_i, D)
            tokens=used,
            truncated=cut,
        )
        for i, (used, cut) in enumerate(zip(encoded.tokens, encoded.truncated, strict=True))
    ]


def stack(entries: Sequence[Entry]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad entries into a batch: hidden (n, Lmax, D), zeros after each entry's tokens, and mask
    (n, Lmax) bool, True on a real token."""
    if not entries:
        raise ValueError("stack needs at least one entry")
    widths = sorted({e.hidden.shape[1] for e in entries})
    if len(widths) > 1:
        raise ValueError(f"entries of different widths {widths}: from different encoders")
    hidden = pad_sequence([e.hidden for e in entries], batch_first=True)  # (n, Lmax, D)
    lengths = torch.tensor([e.hidden.shape[0] for e in entries], device=hidden.device)  # (n,)
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # (Lmax,)
    return hidden, positions[None, :] < lengths[:, None]  # (n, Lmax), (n, Lmax)
