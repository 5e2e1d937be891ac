"""Builders of the small text encoder trained jointly with a text-to-image model: a word-level
tokenizer learnt from the training captions and a T5 encoder sized for it. Tests build tiny ones.

Both are plain ``transformers`` objects: ``save_pretrained`` writes directories that
``TextEncoder.load`` reads back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
# The trainer gives the special tokens the first ids, in this order: pad 0 and eos 1 are T5's.
PAD_ID, EOS_ID = 0, 1


def build_tokenizer(
    corpus: Iterable[str], max_tokens: int, *, vocab_size: int = 30_000, bos: bool = False
) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-split word-level tokenizer with the ``vocab_size`` most frequent
    words of ``corpus`` (special tokens included); unknown words become ``<unk>``. Every prompt
    ends with ``</s>`` (T5's layout) and, with ``bos``, starts with ``<s>`` (CLIP's: its pooled
    output and causal attention expect both). ``max_tokens`` is the tokenizer's
    ``model_max_length``."""
    specials = [PAD, EOS, UNK, BOS] if bos else [PAD, EOS, UNK]
    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = Lowercase()
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.train_from_iterator(
        corpus, WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    template = f"{BOS} $A {EOS}" if bos else f"$A {EOS}"
    tokenizer.post_processor = TemplateProcessing(
        single=template,
        special_tokens=[(t, specials.index(t)) for t in (BOS, EOS) if t in specials],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        **({"bos_token": BOS} if bos else {}),
        model_max_length=max_tokens,
    )


def extend_tokenizer(
    tokenizer: PreTrainedTokenizerFast, corpus: Iterable[str]
) -> PreTrainedTokenizerFast:
    """``tokenizer`` (a ``build_tokenizer`` one) with the words of ``corpus`` it lacks added
    after its own: every id it had keeps its word, so an encoder trained with it keeps its
    embedding rows (and grows new ones for the new ids)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    vocab = backend.get_vocab()
    pre = backend.pre_tokenizer
    normalizer = backend.normalizer
    for text in corpus:
        normal = normalizer.normalize_str(text) if normalizer is not None else text
        words = [w for w, _ in pre.pre_tokenize_str(normal)] if pre is not None else [normal]
        for word in words:
            vocab.setdefault(word, len(vocab))
    backend.model = WordLevel(vocab, unk_token=UNK)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **tokenizer.special_tokens_map,
        model_max_length=tokenizer.model_max_length,
    )


def grow_embeddings(
    encoder: T5EncoderModel,
    tokenizer: PreTrainedTokenizerFast,
    like: Mapping[str, str] | None = None,
    seed: int = 0,
) -> T5EncoderModel:
    """``encoder`` with a row for every id of ``tokenizer`` (an ``extend_tokenizer`` one: the
    encoder's ids first): the trained rows kept; a new word that ``like`` maps to a trained word
    starts as that word's row, any other new one is drawn from a normal with the trained rows'
    mean and spread per dimension (a generator seeded by ``seed``). New words start as distinct
    as trained ones; ``resize_token_embeddings``' own mean-resizing draws them within 1e-9 of
    the covariance, so all new words would start as one vector (the mean, a fifth of a trained
    row's norm) and hardly part in training. In place; returns encoder."""
    old = encoder.get_input_embeddings().weight.detach().clone()
    vocab = tokenizer.get_vocab()
    encoder.resize_token_embeddings(len(vocab), mean_resizing=False)
    rows = encoder.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randn(len(vocab) - len(old), old.shape[1], generator=g)
    with torch.no_grad():
        rows[len(old) :] = old.mean(0) + drawn * old.std(0)
        for word, known in (like or {}).items():
            if vocab.get(word, -1) >= len(old) and 0 <= vocab.get(known, len(old)) < len(old):
                rows[vocab[word]] = old[vocab[known]]
    return encoder


def build_t5(
    vocab_size: int,
    d_model: int,
    layers: int,
    heads: int,
    *,
    d_kv: int | None = None,
    d_ff: int | None = None,
    dropout: float = 0.1,
) -> T5EncoderModel:
    """A randomly initialised T5 encoder (relative position buckets: no fixed length limit).
    ``d_kv`` defaults to ``d_model // heads``, ``d_ff`` to ``4 * d_model``; ``dropout`` is T5's
    own default. Its pad and eos ids are those ``build_tokenizer`` gives."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv if d_kv is not None else d_model // heads,
        d_ff=d_ff if d_ff is not None else 4 * d_model,
        num_layers=layers,
        num_heads=heads,
        dropout_rate=dropout,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    return T5EncoderModel(config)
