"""Training a text-to-video digits model (``skipdit train --preset digits-t2v*``) from a
text-to-image export at the smallest size: Latte's image initialisation of a text network, the
tokenizer grown by the motion words with the image model's ids kept, exact resume, an export
that serves prompts as clips; and the moving-digit clips and captions it trains on, with the
per-frame and motion evaluator that judges it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file
from transformers import T5EncoderModel

from model import registry
from model.networks.presets import build, preset
from model.networks.skip_latte import init_from_image
from model.networks.text_dit import TextDiTConfig, TextSkipDiT
from model.networks.text_latte import TextSkipLatte
from model.text.build import build_tokenizer, extend_tokenizer
from model.training import adherence, bench, motion, scenes, t2i
from model.training.evaluate import load_classifier
from model.training.options import BenchOptions
from tests.helpers import randomized
from tests.model.helpers import train_run

FRAMES = 4  # digits-t2v-tiny


def train(out: Path, steps: int, *more: str) -> None:
    train_run(out, steps, "--objective", "flow", "--batch-size", "2", *more)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2v-runs")
    train(root / "image", 2, "--preset", "digits-t2i-tiny")
    video = ("--preset", "digits-t2v-tiny", "--init-from", str(root / "image" / "final"))
    train(root / "straight", 2, *video)
    train(root / "resumed", 1, *video)
    train(root / "resumed", 2, *video)
    # carried on from the video export of the same network (a step too small to move it)
    more = ("--preset", "digits-t2v-tiny", "--init-from", str(root / "straight" / "final"))
    train(root / "more", 1, *more, "--lr", "1e-12")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.slow
def test_text_to_video_training_resumes_exactly(runs: dict[str, Path]) -> None:
    straight = load_file(runs["straight"] / "snapshots" / "step_000002.safetensors")
    resumed = load_file(runs["resumed"] / "snapshots" / "step_000002.safetensors")
    assert any(k.startswith("dit.blocks.1.") for k in straight)  # a temporal block trains
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


@pytest.mark.slow
def test_the_video_run_starts_from_the_image_export_with_its_word_ids(
    runs: dict[str, Path],
) -> None:
    """The image export's tokenizer with the motion words after its own; the encoder's rows of
    the old ids start as the export's (one step away after training); the card says where it
    started and what it trained on."""
    image, video = runs["image"] / "final", runs["straight"] / "final"
    old = json.loads((image / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    new = json.loads((video / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {w: new[w] for w in old} == old
    assert {"moving", "bouncing", "up", "down"} <= set(new) - set(old)
    rows = T5EncoderModel.from_pretrained(image / "text_encoder").shared.weight
    grown = T5EncoderModel.from_pretrained(video / "text_encoder").shared.weight
    assert grown.shape[0] == len(new) > rows.shape[0]
    assert (grown[: rows.shape[0]] - rows).abs().max() < 0.01
    # "up" and "down" start as "top" and "bottom"; the other new words as distinct as trained
    # ones: at their norms, not one shared vector
    for word, known in motion.LIKE.items():
        assert (grown[new[word]] - rows[old[known]]).abs().max() < 0.01, word
    trained, added = rows.norm(dim=1), grown[rows.shape[0] :].norm(dim=1)
    assert trained.min() / 2 < added.min() and added.max() < trained.max() * 2, (trained, added)
    cos = torch.nn.functional.cosine_similarity(
        grown[None, rows.shape[0] :], grown[rows.shape[0] :, None], dim=-1
    )
    assert cos.fill_diagonal_(0).abs().max() < 0.9, cos
    card = json.loads((video / "config.json").read_text())["card"]
    assert card["init_from"] == str(image) and "model.training.motion" in card["data"]


@pytest.mark.slow
def test_a_text_video_model_carries_on_from_a_video_export_of_its_network(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--init-from`` a text-to-video export of the preset's network: the network, encoder
    and tokenizer go on as they are (no image initialisation, no new words); a video export of
    another network is an error naming ``init_from``."""
    start, more = runs["straight"] / "final", runs["more"] / "final"
    for part in ("model.safetensors", "text_encoder/model.safetensors"):
        was, now = load_file(start / part), load_file(more / part)
        assert was.keys() == now.keys(), part
        for key, value in was.items():
            torch.testing.assert_close(now[key], value, rtol=0, atol=1e-6, msg=f"{part} {key}")
    vocab = [json.loads((d / "tokenizer" / "tokenizer.json").read_text()) for d in (start, more)]
    assert vocab[0]["model"]["vocab"] == vocab[1]["model"]["vocab"]
    card = json.loads((more / "config.json").read_text())["card"]
    assert card["init_from"] == str(start) and card["steps"] == 1
    with pytest.raises(SystemExit) as exit_:  # the full-size preset from the tiny export
        train(tmp_path / "other", 1, "--preset", "digits-t2v", "--init-from", str(start))
    said = capsys.readouterr().err
    assert exit_.value.code == 2 and "init_from: " in said and "another network" in said, said


@pytest.mark.slow
def test_the_video_export_serves_a_prompt_as_a_clip(runs: dict[str, Path]) -> None:
    model = registry.load(str(runs["straight"] / "final"))
    assert (model.info.kind, model.info.conditioning) == ("video", "text")
    pipeline = model.pipeline
    (result,) = pipeline.generate([pipeline.plan(prompt="a 3 moving left", steps=3)])
    assert result.images is not None and result.images.shape == (1, FRAMES, 32, 32, 1)


@pytest.mark.slow
def test_the_bench_judges_a_text_video_model_by_frames_and_motion(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    opts = BenchOptions(
        models=[str(runs["straight"] / "final")], clip_prompts=3, text_steps=3, intervals=[2],
        thresholds=[0.1], out=tmp_path / "bench", command_line="skipdit bench (test)",
    )  # fmt: skip
    rows = bench.bench(opts)
    by = {r.label: r for r in rows}
    assert {"none", "skip_cache N=2", "fora N=2", "delta_dit N=2"} <= set(by)
    assert "toca N=2 r=0.25" not in by  # ToCa applies to images only
    assert by["none"].psnr == float("inf") and by["skip_cache N=2"].flop_ratio > 1
    for row in rows:  # 3 clips of 4 frames: frames in twelfths, clips in thirds
        assert row.fid is None and row.motion is not None
        assert round(row.accuracy * 12, 6) == round(row.accuracy * 12)
        assert round(row.motion * 3, 6) == round(row.motion * 3)
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| motion |" in table and motion.held_out_prompts(3)[0] in table
    assert list((tmp_path / "bench").glob("strip_*skip_cache_N_2.gif"))


def test_a_text_video_starts_from_a_text_image_model_frame_by_frame() -> None:
    """Latte's image init of text networks: everything outside the blocks copied (caption
    projection, t_block, pooling), spatial blocks from image blocks, temporal blocks zeroed to
    the identity (adaLN-single has no zero gate), so without the temporal embedding every frame
    is the image network's output for that frame and text."""
    image = cast(TextSkipDiT, randomized(build(preset("digits-t2i-tiny")), seed=3).eval())
    video = cast(TextSkipLatte, build(preset("digits-t2v-tiny")))
    init_from_image(video, image).eval()
    with torch.no_grad():
        video.temp_embed.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, FRAMES, 32, 32, generator=g)  # (B, C, F, H, W)
    t = torch.tensor([500.0, 20.0])
    text, mask = torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        clips = video(x, t, video.encode_text(text, mask)).transpose(1, 2).flatten(0, 1)
        frames = image(
            x.transpose(1, 2).flatten(0, 1),
            t.repeat_interleave(FRAMES),
            image.encode_text(text.repeat_interleave(FRAMES, 0), mask.repeat_interleave(FRAMES, 0)),
        )
    torch.testing.assert_close(clips, frames, atol=1e-5, rtol=1e-5)
    other = cast(TextDiTConfig, preset("digits-t2i-tiny")).replace(max_tokens=9)
    with pytest.raises(ValueError, match="max_tokens"):
        init_from_image(cast(TextSkipLatte, build(preset("digits-t2v-tiny"))), build(other))


def test_extend_tokenizer_keeps_every_id_and_adds_the_new_words() -> None:
    base = build_tokenizer(scenes.corpus(), 24)
    grown = extend_tokenizer(base, motion.corpus())
    still = "a 7 on the left and a 2 on the right"
    assert grown(still)["input_ids"] == base(still)["input_ids"]
    ids = grown("bouncing up and down, a 5")["input_ids"]
    assert grown.unk_token_id not in ids and base.unk_token_id in base("bouncing up")["input_ids"]
    assert (grown.pad_token_id, grown.eos_token_id, grown.model_max_length) == (0, 1, 24)


# ----------------------------------------------------------------------------- clips and captions


def test_every_motion_wording_parses_back_to_its_clip() -> None:
    for wording in (*motion.TRAIN, *motion.HELD_OUT):
        for name in motion.NAMES:
            for size in scenes.SIZES:
                clip = motion.Clip(7, name, size)
                stated = motion.parse(wording.caption(clip))
                want = size if "{s}" in wording.text else None
                assert stated == motion.Clip(7, name, want), wording.text
    with pytest.raises(ValueError, match="prompt"):
        motion.parse("a 7 on the left")


def test_training_never_draws_a_held_out_wording_or_combination() -> None:
    g = torch.Generator().manual_seed(0)
    clips, captions = motion.ClipRenderer(FRAMES).batch(300, g)
    assert clips.shape == (300, 1, FRAMES, 32, 32)
    held = {w.pattern for w in motion.HELD_OUT}
    for text in captions:
        assert not any(p.match(text) for p in held), text
        assert not motion.parse(text).held_out_combo, text
    train_words = {w for c in motion.corpus() for w in c.replace(",", " , ").split()}
    for prompt in motion.held_out_prompts(100):
        assert set(prompt.replace(",", " , ").split()) <= train_words, prompt


def test_boosted_motions_are_drawn_that_much_more_often_and_never_held_out() -> None:
    def shares(boost: dict[str, float] | None, seed: int = 0) -> dict[str, float]:
        g = torch.Generator().manual_seed(seed)
        clips = [motion.random_clip(g, boost=boost) for _ in range(6000)]
        assert not any(c.held_out_combo for c in clips)
        return {m: sum(c.motion == m for c in clips) / len(clips) for m in motion.NAMES}

    plain, boosted = shares(None), shares({"up": 3.0, "down": 3.0})
    assert all(abs(share - 1 / 6) < 0.02 for share in plain.values()), plain
    for name, share in boosted.items():  # weights 3, 3 and four 1s: 0.3 each, 0.1 each
        assert abs(share - (0.3 if name in ("up", "down") else 0.1)) < 0.02, boosted


def test_held_out_prompts_are_held_out_in_wording_or_combination() -> None:
    prompts = motion.held_out_prompts(100)
    assert len(set(prompts)) > 60
    for i, prompt in enumerate(prompts):
        wording = any(w.pattern.match(prompt) for w in motion.HELD_OUT)
        assert wording if i < 50 else motion.parse(prompt).held_out_combo, prompt


def test_motion_captions_label_the_digit_token_with_digit_motion_and_size() -> None:
    tokenizer = extend_tokenizer(build_tokenizer(scenes.corpus(), 24), motion.corpus())
    captions = ["moving up, the digit 4", "a small 9 bouncing left and right", ""]
    tokens = tokenizer(captions, padding=True, return_tensors="pt", return_offsets_mapping=True)
    labels = t2i.parse_labels(captions, tokens["offset_mapping"])
    ids = tokens["input_ids"]
    stated = [
        (tokenizer.convert_ids_to_tokens(int(ids[r, j])), labels[r, j].tolist())
        for r in range(3)
        for j in range(ids.shape[1])
        if labels[r, j, 0] != t2i.IGNORE
    ]
    up, sideways = motion.NAMES.index("up"), motion.NAMES.index("left and right")
    assert stated == [("4", [4, up, 2]), ("9", [9, sideways, 0])]


# ----------------------------------------------------------------------------- the evaluator


def test_rendered_clips_pass_frame_by_frame_and_reversed_straight_motions_fail() -> None:
    renderer, classifier = motion.ClipRenderer(8), load_classifier()
    g = torch.Generator().manual_seed(1)
    prompts = motion.held_out_prompts(40)
    clips = torch.stack([renderer.render(motion.parse(p), g) for p in prompts])
    judged = adherence.judge_clips(classifier, prompts, clips)
    assert adherence.frame_adherence(judged) > 0.9
    assert adherence.motion_adherence(judged) == 1.0
    reversed_ = adherence.judge_clips(classifier, prompts, clips.flip(2))
    for prompt, j in zip(prompts, reversed_, strict=True):
        straight = motion.MOTIONS[motion.parse(prompt).motion][1] != 0
        assert j.moved != straight, prompt  # a bounce played backwards is still a bounce
    still = clips[:, :, :1].expand_as(clips)  # the first frame held: no motion at all
    assert adherence.motion_adherence(adherence.judge_clips(classifier, prompts, still)) == 0
    blank = -torch.ones_like(clips[:1])
    (empty,) = adherence.judge_clips(classifier, prompts[:1], blank)
    assert empty.frames_passed == 0 and not empty.moved and set(empty.seen) == {None}
