"""Training a text-to-image digits model (``skipdit train --preset digits-t2i*``) at the
smallest size: the flow objective, jointly trained text encoder, exact resume, and an export
that loads through the registry's card path; and the scenes and captions it trains on, with the
prompt-adherence evaluator that judges it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file

from model import registry
from model.errors import FieldError
from model.networks.presets import preset
from model.networks.text_dit import TextDiTConfig
from model.text.build import build_tokenizer
from model.training import adherence, bench, scenes, t2i
from model.training.evaluate import load_classifier
from model.training.options import BenchOptions
from tests.model.helpers import train_run


def train(out: Path, steps: int, *more: str) -> None:
    train_run(
        out, steps, "--preset", "digits-t2i-tiny", "--objective", "flow", "--batch-size", "4", *more
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i-runs")
    train(root / "straight", 4)
    train(root / "resumed", 2)
    train(root / "resumed", 4)
    # another seed: a start that ignored the export would begin far from its weights
    train(root / "started", 1, "--init-from", str(root / "straight" / "final"), "--seed", "1")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.slow
def test_flow_training_resumes_exactly_encoder_included(runs: dict[str, Path]) -> None:
    straight = load_file(runs["straight"] / "snapshots" / "step_000004.safetensors")
    resumed = load_file(runs["resumed"] / "snapshots" / "step_000004.safetensors")
    assert any(k.startswith("encoder.") for k in straight)  # the text encoder trains too
    # the denoising loss, then the encoder's scene-parse loss apart
    assert (runs["straight"] / "loss.csv").read_text().splitlines()[0] == "step,loss,seconds,parse"
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


@pytest.mark.slow
def test_the_export_serves_prompts_through_the_card_path(runs: dict[str, Path]) -> None:
    final = runs["straight"] / "final"
    card = json.loads((final / "config.json").read_text())["card"]
    assert card["objective"] == "flow" and card["sampler"] == "flow_euler"
    assert (card["text_encoder"], card["tokenizer"]) == ("text_encoder", "tokenizer")
    pipeline = registry.load(str(final)).pipeline
    (result,) = pipeline.generate([pipeline.plan(prompt="a 7 on the left", steps=3)])
    assert result.images is not None and result.images.shape == (1, 32, 32, 1)


@pytest.mark.slow
def test_a_run_started_from_an_export_takes_its_weights_and_tokenizer(
    runs: dict[str, Path],
) -> None:
    """``--init-from`` an exported text model: its tokenizer, and weights one step away from the
    export's (the run's own seed would start them elsewhere)."""
    final, started = runs["straight"] / "final", runs["started"]
    card = json.loads((started / "final" / "config.json").read_text())["card"]
    assert card["init_from"] == str(final) and card["flow_t"] == "logit-normal"
    tokenizer = (final / "tokenizer" / "tokenizer.json").read_text()
    assert (started / "tokenizer" / "tokenizer.json").read_text() == tokenizer
    export = load_file(final / "model.safetensors")
    after = load_file(started / "final" / "model.safetensors")
    for key, value in export.items():
        assert (after[key] - value).abs().max() < 0.01, key


def test_start_from_keeps_fresh_only_what_the_new_preset_adds(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(["a 7 on the left"], 8)
    tiny = cast(TextDiTConfig, preset("digits-t2i-tiny"))
    old = t2i.fresh(tiny.replace(pooled_text=False), tokenizer)
    t2i.export(old, tokenizer, tmp_path / "old", {"name": "old"})
    new = t2i.fresh(tiny, tokenizer)
    assert sorted(t2i.start_from(new, tmp_path / "old", tokenizer)) == [
        "text_pool.bias",
        "text_pool.weight",
    ]
    for key, value in old.state_dict().items():
        if not key.startswith("parse_head."):  # training's own: not in an export
            assert torch.equal(new.state_dict()[key], value), key
    wider = t2i.fresh(tiny.replace(hidden_size=48), tokenizer)
    with pytest.raises(FieldError, match="init_from"):
        t2i.start_from(wider, tmp_path / "old", tokenizer)


def _labels(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    tokens = tokenizer(captions, padding=True, return_tensors="pt", return_offsets_mapping=True)
    return tokens["input_ids"], t2i.parse_labels(captions, tokens["offset_mapping"])


def test_each_stated_digit_token_is_labelled_with_its_digit_place_and_size() -> None:
    tokenizer = build_tokenizer(scenes.corpus(), 24)
    captions = [
        "a 1 at the bottom and a 9 at the top",  # the pair stated out of Scene order
        "a small 8",  # unplaced: the centre
        "a small 3 on the left and a large 3 on the right",  # the same digit twice
        "",  # a dropped caption: nothing to read
    ]
    ids, labels = _labels(tokenizer, captions)
    place, size = scenes.PLACES.index, t2i.SIZE_LABELS.index
    read = [
        {tokenizer.convert_ids_to_tokens(int(ids[r, j])): labels[r, j].tolist()}
        for r in range(len(captions))
        for j in range(ids.shape[1])
        if labels[r, j, 0] != t2i.IGNORE
    ]
    assert read == [
        {"1": [1, place("bottom"), size(None)]},
        {"9": [9, place("top"), size(None)]},
        {"8": [8, place("centre"), size("small")]},
        {"3": [3, place("left"), size("small")]},
        {"3": [3, place("right"), size("large")]},
    ]


@pytest.mark.slow
def test_the_parse_loss_teaches_the_encoder_to_read_each_digit_and_its_place() -> None:
    """Training on the parse loss alone, the encoder's digit tokens come to read as their digit
    and place on captions it never trained on (labels on the wrong token would not teach it)."""
    torch.manual_seed(0)
    config = preset("digits-t2i-tiny")
    assert isinstance(config, TextDiTConfig)
    tokenizer = build_tokenizer(scenes.corpus(), 24)
    trainee = t2i.fresh(config, tokenizer)
    opt = torch.optim.Adam([*trainee.encoder.parameters(), *trainee.parse_head.parameters()], 3e-3)
    renderer, x, t = scenes.Renderer(), torch.zeros(1, 1, 32, 32), torch.zeros(1)

    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, captions = renderer.batch(64, torch.Generator().manual_seed(seed))
        tokens = tokenizer(captions, padding=True, return_tensors="pt", return_offsets_mapping=True)
        labels = t2i.parse_labels(captions, tokens["offset_mapping"])
        return tokens["input_ids"], tokens["attention_mask"], labels

    for step in range(300):
        ids, mask, labels = batch(step)
        _, loss = trainee.losses(x.expand(len(ids), -1, -1, -1), t, ids, mask, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, mask, labels = batch(10_000)
    trainee.eval()
    with torch.no_grad():
        hidden = trainee.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    stated = labels[..., 0] != t2i.IGNORE
    logits = trainee.parse_head(hidden[stated]).split(list(t2i.PARSE.values()), dim=-1)
    digit, place = (lg.argmax(-1) for lg in logits[:2])
    assert (digit == labels[stated][:, 0]).float().mean() >= 0.95
    assert (place == labels[stated][:, 1]).float().mean() >= 0.95


def test_every_caption_parses_back_to_its_scene() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        scene = scenes.random_scene(g, held_out=None)
        for wording in (*scenes.TRAIN, *scenes.HELD_OUT):
            if wording.fits(scene):
                parsed = scenes.parse(wording.caption(scene))
                assert parsed.places == scene.places
                assert [i.digit for i in parsed.items] == [i.digit for i in scene.items]
    with pytest.raises(ValueError, match="prompt"):
        scenes.parse("a red cat on a sofa")


def test_training_never_sees_what_is_held_out() -> None:
    train_words = {w for c in scenes.corpus() for w in c.replace(",", " , ").split()}
    g = torch.Generator().manual_seed(1)
    _, captions = scenes.Renderer().batch(200, g)
    held_texts = {w.text for w in scenes.HELD_OUT}
    for caption in captions:
        scene = scenes.parse(caption)
        assert not scene.held_out_combo
        assert not any(w.parse(caption) for w in scenes.HELD_OUT), caption
    assert held_texts.isdisjoint(w.text for w in scenes.TRAIN)
    prompts = scenes.held_out_prompts(200)
    for prompt in prompts:  # each held out one way or both, in words training knows
        held_wording = any(w.parse(prompt) for w in scenes.HELD_OUT)
        assert held_wording or scenes.parse(prompt).held_out_combo, prompt
        assert set(prompt.replace(",", " , ").split()) <= train_words, prompt


@pytest.mark.parametrize("jitter", [scenes.JITTER, 6])
def test_the_evaluator_passes_drawn_scenes_and_fails_wrong_digits(jitter: int) -> None:
    g = torch.Generator().manual_seed(2)
    renderer, classifier = scenes.Renderer(jitter=jitter), load_classifier()
    prompts = scenes.held_out_prompts(100, seed=3)
    images = torch.stack([renderer.render(scenes.parse(p), g) for p in prompts])
    assert adherence.adherence(adherence.judge(classifier, prompts, images)) >= 0.97
    wrong = [p.replace(str(scenes.parse(p).items[0].digit), "X", 1) for p in prompts]
    wrong = [w.replace("X", str((scenes.parse(p).items[0].digit + 1) % 10)) for w, p in
             zip(wrong, prompts, strict=True)]  # fmt: skip
    assert adherence.adherence(adherence.judge(classifier, wrong, images)) <= 0.05
    blank = -torch.ones_like(images)
    assert adherence.adherence(adherence.judge(classifier, prompts, blank)) == 0


def test_more_jitter_spreads_a_place_over_more_positions_inside_its_region() -> None:
    def ink_centres(jitter: int) -> torch.Tensor:
        g, renderer = torch.Generator().manual_seed(0), scenes.Renderer(jitter=jitter)
        scene = scenes.Scene((scenes.Item(3, "left", "small"),))
        images = torch.stack([renderer.render(scene, g)[0] for _ in range(200)])  # (n, S, S)
        ink = (images + 1) / 2
        (r0, r1), (c0, c1) = scenes.REGIONS["left"]
        assert ink[:, :, :c0].sum() == ink[:, :, c1:].sum() == 0
        assert ink[:, :r0].sum() == ink[:, r1:].sum() == 0
        grid = torch.arange(scenes.CANVAS, dtype=torch.float32)
        mass = ink.sum((1, 2))
        return torch.stack([(ink.sum(2) * grid).sum(1) / mass, (ink.sum(1) * grid).sum(1) / mass])

    narrow, wide = ink_centres(0), ink_centres(6)
    assert (wide.std(1) > 2 * narrow.std(1)).all()  # rows and columns both


@pytest.mark.slow
def test_the_bench_judges_a_text_model_by_prompt_adherence(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    opts = BenchOptions(
        models=[str(runs["straight"] / "final")], prompts=3, text_steps=4, intervals=[2],
        thresholds=[0.1], out=tmp_path / "bench", command_line="skipdit bench (test)",
    )  # fmt: skip
    rows = bench.bench(opts)
    by = {r.label: r for r in rows}
    assert {"none", "skip_cache N=2", "fora N=2", "toca N=2 r=0.25"} <= set(by)
    assert by["none"].psnr == float("inf") and by["skip_cache N=2"].flop_ratio > 1
    for row in rows:  # adherence of 3 prompts: a share in thirds, no FID
        assert row.fid is None and round(row.accuracy * 3, 6) == round(row.accuracy * 3)
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "prompt adherence" in table and "grid's columns are the prompts" in table
    assert (tmp_path / "bench" / "grid.png").stat().st_size > 0
