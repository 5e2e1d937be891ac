"""What training a text-to-image digit model adds to ``model.training.train``: the network and
its text encoder trained jointly (``Trainee``), batches of captioned scenes
(``model.training.scenes``), and the export: the network in our format beside the encoder and
tokenizer in ``transformers``' (``save_pretrained``), loaded back through the card path real
checkpoints take. A run may start from an exported model (``--init-from``: ``start_from``), its
network gaining the modules a newer preset adds.

The text encoder is a small T5 encoder built from a ``transformers`` config; the tokenizer is a
word-level ``tokenizers`` model trained on every caption training can produce. A caption is
replaced by the empty prompt with the config's ``caption_dropout_prob``: the unconditional
branch of guidance is the encoded empty prompt.

Scene parsing, an auxiliary loss on the encoder (``--parse-weight``): a linear head reads each
stated digit's token of the encoder's output and predicts the digit, its place and its size (or
"not stated"), from the scene the caption was made from. Trained on the denoising loss alone,
the jointly trained encoder maps the ten digit tokens close together within a few hundred steps
(where the ink goes is what the text first has to say), and the image loses the digit's
identity; the parse loss keeps identity and the digit's place readable in each digit's token,
factorised so that a held-out (digit, place) combination is two familiar readings. The head is
for training only: the export holds the network, the encoder and the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerFast, T5EncoderModel

from model.errors import FieldError
from model.networks.checkpoint import WEIGHTS_FILE, load_pretrained, save_pretrained
from model.networks.presets import build
from model.networks.skip_latte import SkipLatte, start_video
from model.networks.text_dit import TextDiTConfig, TextSkipDiT
from model.text.build import build_t5, build_tokenizer, extend_tokenizer, grow_embeddings
from model.text.encoder import encoder_states
from model.training import motion, scenes

ENCODER_DIR = "text_encoder"  # beside model.safetensors in an exported model
TOKENIZER_DIR = "tokenizer"
ENCODER_LAYERS = 3
ENCODER_HEADS = 4


# What the parse head reads from a stated digit's token: classes per reading, in label order;
# of a motion caption (a text-to-video run), the motion in place of the place.
PARSE = {"digit": 10, "place": len(scenes.PLACES), "size": len(scenes.SIZES) + 1}
MOTION_PARSE = {"digit": 10, "motion": len(motion.NAMES), "size": len(scenes.SIZES) + 1}
SIZE_LABELS = (*scenes.SIZES, None)  # a size label's meaning: small, large, not stated
IGNORE = -100  # the label of a token that states no digit (cross_entropy's ignore_index)


def readings(config: TextDiTConfig) -> dict[str, int]:
    """The parse head's readings for a run of ``config``'s kind."""
    return MOTION_PARSE if config.kind == "video" else PARSE


class Trainee(nn.Module):
    """The network, its text encoder and the encoder's scene-parse head (training only): one
    module to optimise, average and checkpoint."""

    def __init__(self, dit: TextSkipDiT, encoder: T5EncoderModel):
        super().__init__()
        self.dit = dit
        self.encoder = encoder
        self.parse_head = nn.Linear(dit.config.text_dim, sum(readings(dit.config).values()))

    @property
    def config(self) -> TextDiTConfig:
        return self.dit.config

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,), token ids and attention mask (B, L) -> network output."""
        return self.losses(x, t, ids, mask)[0]

    def losses(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(network output, scene-parse loss): the loss is the sum over ``readings``' of
        the cross-entropy on the tokens ``labels`` (B, L, readings) marks; 0 without any."""
        with_embeddings = self.config.text_values == "embeddings"
        states = encoder_states(self.encoder, ids, mask, with_embeddings)  # (B, L, text_width)
        out = self.dit(x, t, self.dit.encode_text(states, mask))
        hidden = states[..., : self.config.text_dim]  # (B, L, C): the last hidden states
        if labels is None or not (stated := labels[..., 0] != IGNORE).any():  # (B, L)
            return out, hidden.new_zeros((), dtype=torch.float32)
        sizes = list(readings(self.config).values())
        logits = self.parse_head(hidden[stated]).float().split(sizes, dim=-1)
        wanted = labels[stated]  # (tokens, readings)
        loss = sum(F.cross_entropy(lg, wanted[:, i]) for i, lg in enumerate(logits))
        return out, cast(torch.Tensor, loss)


def tokenizer_for(
    config: TextDiTConfig, run_dir: Path, start: Path | None = None
) -> PreTrainedTokenizerFast:
    """The run's tokenizer: the exported model's it starts from (``start``), else trained on
    the captions at the run's start; kept in the run directory, so a resumed run tokenizes as
    the first did."""
    path = run_dir / TOKENIZER_DIR
    if path.exists():
        return _load_tokenizer(path)
    if start is not None:  # a text-to-video run adds the motion words to the image model's
        tokenizer = _load_tokenizer(start / TOKENIZER_DIR)
        if config.kind == "video":
            tokenizer = extend_tokenizer(tokenizer, motion.corpus())
    else:
        tokenizer = build_tokenizer(corpus(config), config.max_tokens)
    tokenizer.save_pretrained(path)
    return tokenizer


def corpus(config: TextDiTConfig) -> Iterator[str]:
    """Every caption a run of ``config``'s kind can train on."""
    yield from motion.corpus() if config.kind == "video" else scenes.corpus()


def _load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    loaded = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    return loaded


def fresh(config: TextDiTConfig, tokenizer: PreTrainedTokenizerFast) -> Trainee:
    """An untrained network (of the config's kind) and T5 encoder of width ``config.text_dim``."""
    encoder = build_t5(
        vocab_size=len(tokenizer),
        d_model=config.text_dim,
        layers=ENCODER_LAYERS,
        heads=ENCODER_HEADS,
    )
    return Trainee(cast(TextSkipDiT, build(config)), encoder)  # a TextSkipLatte for video


def start_from(trainee: Trainee, directory: Path, tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """Load an exported model (``export``'s layout) into ``trainee``: the network's weights by
    name, the encoder's all. Returns the network's parameters the export lacks (modules a newer
    config adds, such as ``text_pool``): they keep their fresh init. Anything else that differs
    (a shape, a parameter the trainee lacks, the encoder) is a FieldError('init_from').

    A text-to-video trainee starts from a text-to-image export by Latte's image initialisation
    (``start_video``); the encoder's vocabulary grows to the trainee's ``tokenizer`` (the words
    the motion captions add, ``grow_embeddings``: "up" and "down" start as the rows of "top"
    and "bottom", ``motion.LIKE``, the others drawn at the trained rows' spread). From a
    text-to-video export of its network it carries on: the network and encoder as they are."""
    encoder = T5EncoderModel.from_pretrained(directory / ENCODER_DIR, local_files_only=True)
    missing: list[str] = []
    try:  # a shape that differs raises even when not strict
        if trainee.config.kind == "video":
            start, _ = load_pretrained(directory)
            start_video(cast(SkipLatte, trainee.dit), start)
            grow_embeddings(encoder, tokenizer, motion.LIKE)
        else:
            missing, unexpected = trainee.dit.load_state_dict(
                load_file(directory / WEIGHTS_FILE), strict=False
            )
            if unexpected:
                raise FieldError(
                    "init_from", f"{directory} has parameters the preset lacks: {unexpected}"
                )
        trainee.encoder.load_state_dict(encoder.state_dict())
    except (RuntimeError, ValueError) as e:
        raise FieldError("init_from", f"{directory} does not fit this preset: {e}") from e
    return missing


class Batches:
    """Captioned scenes, each step's drawn from that step's generator."""

    def __init__(
        self,
        config: TextDiTConfig,
        tokenizer: PreTrainedTokenizerFast,
        jitter: int = scenes.JITTER,
        boost: dict[str, float] | None = None,
    ):
        """``jitter``: a scene's (``scenes.Renderer``); clips keep their own. ``boost``: motions
        a clip batch draws that many times as often as the others (``motion.random_clip``)."""
        self.config = config
        self.tokenizer = tokenizer
        self.renderer: scenes.Renderer | motion.ClipRenderer = (
            motion.ClipRenderer(config.num_frames, boost=boost)
            if config.kind == "video"
            else scenes.Renderer(jitter=jitter)
        )

    def draw(
        self, n: int, g: torch.Generator
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images (n, 1, S, S) or clips (n, 1, F, S, S), (token ids, attention mask (n, L),
        parse labels (n, L, 3))), captions dropped to the empty prompt with the config's
        probability."""
        images, captions = self.renderer.batch(n, g)
        drop = torch.rand(n, generator=g) < self.config.caption_dropout_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        tokens = self.tokenizer(
            captions,
            padding=True,
            truncation=True,
            max_length=self.config.max_tokens,
            return_tensors="pt",
            return_offsets_mapping=True,
        )
        labels = parse_labels(captions, tokens["offset_mapping"])
        return images, (tokens["input_ids"], tokens["attention_mask"], labels)


def parse_labels(captions: list[str], offsets: torch.Tensor) -> torch.Tensor:
    """(n, L, 3) labels (digit, place or motion, size) of each token that states a digit,
    ``IGNORE`` elsewhere; ``offsets`` (n, L, 2): each token's characters (the tokenizer's
    ``offset_mapping``). Captions of scenes and of motions both parse."""
    labels = torch.full((*offsets.shape[:2], len(PARSE)), IGNORE, dtype=torch.long)
    for row, caption in enumerate(captions):
        if not caption:
            continue
        for span, label in _stated(caption):
            hit = (offsets[row] == torch.tensor(span)).all(-1).nonzero()
            if len(hit):  # absent when truncation cut the digit off
                labels[row, int(hit[0])] = torch.tensor(label)
    return labels


def _stated(caption: str) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
    """Each stated digit's characters and its labels (digit, place or motion, size)."""
    try:
        span, clip = motion.digit_span(caption)
    except ValueError:
        return [
            ((start, end), (item.digit, scenes.PLACES.index(item.place), _size(item.size)))
            for (start, end), item in scenes.digit_spans(caption)
        ]
    return [(span, (clip.digit, motion.NAMES.index(clip.motion), _size(clip.size)))]


def _size(size: str | None) -> int:
    return SIZE_LABELS.index(size)


def export(
    ema: Trainee, tokenizer: PreTrainedTokenizerFast, directory: Path, card: dict[str, Any]
) -> Path:
    """The averaged network in our format, its encoder and tokenizer beside it; the card names
    them (relative paths) and the prompt length."""
    card = card | {
        "text_encoder": ENCODER_DIR,
        "tokenizer": TOKENIZER_DIR,
        "max_tokens": ema.config.max_tokens,
    }
    save_pretrained(ema.dit, directory, card=card)
    ema.encoder.save_pretrained(directory / ENCODER_DIR)
    tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    return directory
