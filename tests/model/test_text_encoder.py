"""model/text: tiny T5 and CLIP text encoders with word-level tokenizers, saved into directories
and loaded back through ``TextEncoder.load``; the embedding cache on the loaded T5."""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, GPT2Config

from model.text.build import build_t5, build_tokenizer
from model.text.cache import EmbeddingCache, Entry, stack
from model.text.encoder import TextEncoder, TextEncoderError

MAX_TOKENS = 8
CAPTIONS = [
    "a red cat sits on a mat",
    "a small blue dog runs on green grass",
    "two birds fly over the sea at dusk",
    "an old man reads a book under a tree",
    "a white boat on a calm lake",
]
# Prompts of different lengths: the empty prompt (guidance's unconditional branch), short ones,
# one that fills max_tokens exactly with T5's eos, and one cut.
PROMPTS = [
    "",
    "a red cat",
    "two birds fly over the calm sea",
    "a small blue dog runs on green grass near a white boat",
    "zebra",
]
# fp32: a prompt in a padded batch differs from the same prompt alone only in the shapes of the
# matmuls (summation order); attention to padding would move it by the order of the activations.
BATCH_RTOL = BATCH_ATOL = 1e-5


@dataclass(frozen=True)
class Saved:
    directory: Path  # encoder and tokenizer, saved together
    built: TextEncoder  # the in-memory encoder that was saved, eval mode
    specials: int  # special tokens per prompt: eos, plus bos for CLIP


def save_t5(directory: Path) -> Saved:
    tokenizer = build_tokenizer(CAPTIONS, MAX_TOKENS)
    torch.manual_seed(0)
    model = build_t5(len(tokenizer), d_model=32, layers=2, heads=4, d_kv=8, d_ff=64)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return Saved(directory, TextEncoder(tokenizer, model, MAX_TOKENS).eval(), specials=1)


def save_clip(directory: Path) -> Saved:
    tokenizer = build_tokenizer(CAPTIONS, MAX_TOKENS, bos=True)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = CLIPTextModel(config)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return Saved(directory, TextEncoder(tokenizer, model, MAX_TOKENS).eval(), specials=2)


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return save_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(params=["t5", "clip"])
def saved(request: pytest.FixtureRequest) -> Saved:
    return request.getfixturevalue(request.param)


def load(saved: Saved, dtype: torch.dtype = torch.float32) -> TextEncoder:
    return TextEncoder.load(saved.directory, saved.directory, MAX_TOKENS, "cpu", dtype)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every socket connect fails and is recorded: the list stays empty if nothing tried."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []

    def refuse(sock: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# ----------------------------------------------------------------------------- encoder


def test_load_gives_the_saved_encoders_output(saved: Saved, no_network: list[object]) -> None:
    loaded = load(saved)
    assert not loaded.training
    assert loaded.model is not saved.built.model
    got, want = loaded.encode(PROMPTS), saved.built.encode(PROMPTS)
    assert torch.equal(loaded.tokenize(PROMPTS)[0], saved.built.tokenize(PROMPTS)[0])
    assert torch.equal(got.mask, want.mask)
    assert got.hidden.dtype == torch.float32
    assert got.hidden.abs().amax() > 0.1
    torch.testing.assert_close(got.hidden, want.hidden, rtol=0, atol=0)
    assert not no_network


def test_load_casts_to_dtype(t5: Saved) -> None:
    loaded = load(t5, torch.bfloat16)
    assert loaded.encode(PROMPTS).hidden.dtype == torch.bfloat16


def test_batch_gives_each_prompt_its_encoding_alone(saved: Saved) -> None:
    encoder = load(saved)
    batch = encoder.encode(PROMPTS)
    assert batch.hidden.shape[:2] == batch.mask.shape == (len(PROMPTS), MAX_TOKENS)
    assert not batch.mask.all()  # there is padding to ignore
    for i, prompt in enumerate(PROMPTS):
        alone = encoder.encode([prompt])
        assert alone.mask.all()
        assert alone.hidden.shape[1] == batch.tokens[i] == batch.mask[i].sum()
        torch.testing.assert_close(
            batch.hidden[i, batch.mask[i]], alone.hidden[0], rtol=BATCH_RTOL, atol=BATCH_ATOL
        )


def test_truncation_is_reported_with_the_tokens_used(saved: Saved) -> None:
    encoder = load(saved)
    fits = " ".join(["cat"] * (MAX_TOKENS - saved.specials))  # exactly max_tokens
    over = fits + " cat"  # one more
    encoded = encoder.encode(["a red cat", fits, over, ""])
    assert encoded.tokens == [3 + saved.specials, MAX_TOKENS, MAX_TOKENS, saved.specials]
    assert encoded.truncated == [False, False, True, False]
    input_ids, _ = encoder.tokenize([over])
    assert input_ids[0, -1] == encoder.tokenizer.eos_token_id  # cut before the end token


def test_encode_runs_in_inference_mode_and_forward_trains(t5: Saved) -> None:
    encoder = load(t5)
    assert encoder.encode(PROMPTS).hidden.is_inference()
    encoder.train()
    input_ids, attention_mask = encoder.tokenize(PROMPTS)
    encoder(input_ids, attention_mask).square().mean().backward()
    embeddings = encoder.model.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)
    grad = embeddings.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    assert encoder.encode(PROMPTS).hidden.requires_grad


def test_unsupported_model_type_is_named(tmp_path: Path, t5: Saved) -> None:
    GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(
        TextEncoderError, match=r"'gpt2'.*\['bert', 'clip_text_model', 'mt5', 't5'\]"
    ):
        TextEncoder.load(tmp_path, t5.directory, MAX_TOKENS, "cpu")


@pytest.mark.parametrize("missing", ["weights", "tokenizer", "directory"])
def test_missing_files_raise_without_a_download(
    missing: str, t5: Saved, tmp_path: Path, no_network: list[object]
) -> None:
    """A directory short of a file fails naming it; nothing is fetched in its place (a bare
    config.json as the tokenizer directory would otherwise give an empty-vocabulary tokenizer)."""
    encoder_dir, tokenizer_dir = t5.directory, t5.directory
    if missing == "directory":
        encoder_dir = tmp_path / "absent"
    else:
        shutil.copy(t5.directory / "config.json", tmp_path)  # a config without its companions
        encoder_dir, tokenizer_dir = (
            (tmp_path, t5.directory) if missing == "weights" else (t5.directory, tmp_path)
        )
    with pytest.raises(TextEncoderError, match=str(tmp_path)):
        TextEncoder.load(encoder_dir, tokenizer_dir, MAX_TOKENS, "cpu")
    assert not no_network


def test_max_tokens_beyond_clips_positions_is_refused(clip: Saved) -> None:
    with pytest.raises(ValueError, match="position embeddings"):
        TextEncoder(clip.built.tokenizer, clip.built.model, MAX_TOKENS + 1)


# ----------------------------------------------------------------------------- cache


@pytest.fixture
def counted(t5: Saved) -> tuple[TextEncoder, list[int]]:
    """The loaded T5 encoder and the batch size of each of its model's forward calls."""
    encoder = load(t5)
    batches: list[int] = []
    encoder.model.register_forward_hook(
        lambda module, args, kwargs, out: batches.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    return encoder, batches


def test_repeated_prompt_is_a_hit(counted: tuple[TextEncoder, list[int]]) -> None:
    encoder, batches = counted
    cache = EmbeddingCache(capacity=4)
    (first,) = cache.encode_cached(encoder, "t5", ["a red cat"])
    assert (cache.hits, cache.misses, batches) == (0, 1, [1])
    (again,) = cache.encode_cached(encoder, "t5", ["a red cat"])
    assert (cache.hits, cache.misses, batches) == (1, 1, [1])
    assert again is first
    assert first.hidden.shape == (4, 32) and first.tokens == 4 and not first.truncated
    cache.encode_cached(encoder, "other-model", ["a red cat"])  # keyed by model name too
    assert (cache.hits, cache.misses, batches) == (1, 2, [1, 1])


def test_misses_of_a_batch_are_encoded_in_one_call(
    counted: tuple[TextEncoder, list[int]],
) -> None:
    encoder, batches = counted
    cache = EmbeddingCache(capacity=8)
    cache.encode_cached(encoder, "t5", ["a red cat"])
    prompts = ["a red cat", PROMPTS[3], "a white boat", PROMPTS[3]]  # 4, 8 (cut), 4, 8 tokens
    entries = cache.encode_cached(encoder, "t5", prompts)
    assert batches == [1, 2]  # the two new prompts, the repeated one once
    assert (cache.hits, cache.misses) == (2, 3)
    assert entries[1] is entries[3]
    for prompt, entry in zip(prompts, entries, strict=True):
        alone = encoder.encode([prompt])
        assert (entry.tokens, entry.truncated) == (alone.tokens[0], alone.truncated[0])
        torch.testing.assert_close(entry.hidden, alone.hidden[0], rtol=BATCH_RTOL, atol=BATCH_ATOL)
    assert [e.truncated for e in entries] == [False, True, False, True]


def test_lru_evicts_the_least_recently_used(counted: tuple[TextEncoder, list[int]]) -> None:
    encoder, batches = counted
    cache = EmbeddingCache(capacity=2)
    for prompt in ["a", "b", "a", "c"]:  # "a" used again after "b": "b" is the oldest at "c"
        cache.encode_cached(encoder, "t5", [prompt])
    assert ("t5", "a") in cache and ("t5", "c") in cache
    assert ("t5", "b") not in cache
    assert len(cache) == 2
    cache.encode_cached(encoder, "t5", ["b"])
    assert ("t5", "a") not in cache  # now the oldest
    assert (cache.hits, cache.misses, len(batches)) == (1, 4, 4)


def test_the_empty_prompt_is_pinned(counted: tuple[TextEncoder, list[int]]) -> None:
    encoder, batches = counted
    cache = EmbeddingCache(capacity=1)
    (empty,) = cache.encode_cached(encoder, "t5", [""])
    assert empty.tokens == 1  # the end token alone
    for prompt in ["a", "b", "c"]:
        cache.encode_cached(encoder, "t5", [prompt])
    assert ("t5", "") in cache and ("t5", "a") not in cache
    assert len(cache) == 2  # the pinned one beside the capacity of 1
    calls = len(batches)
    (again, _) = cache.encode_cached(encoder, "t5", ["", "c"])
    assert again is empty and len(batches) == calls
    cache.encode_cached(encoder, "other-model", [""])  # once per model
    assert len(batches) == calls + 1 and ("other-model", "") in cache


def test_the_cache_refuses_an_encoder_in_training(t5: Saved) -> None:
    with pytest.raises(ValueError, match="training"):
        EmbeddingCache(capacity=1).encode_cached(load(t5).train(), "t5", ["a"])


def test_stack_pads_entries_into_a_batch() -> None:
    entries = [
        Entry(hidden=torch.randn(length, 6), tokens=length, truncated=False) for length in (3, 1, 5)
    ]
    hidden, mask = stack(entries)
    assert hidden.shape == (3, 5, 6) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [3, 1, 5]
    for i, entry in enumerate(entries):
        assert torch.equal(hidden[i, mask[i]], entry.hidden)
    assert not hidden[~mask].any()
    with pytest.raises(ValueError, match="widths"):
        stack([*entries, Entry(hidden=torch.randn(2, 4), tokens=2, truncated=False)])
