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
    assert sorted(t2i.start_from(new, tmp_path / "old")) == ["text_pool.bias", "text_pool.weight"]
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    wider = t2i.fresh(tiny.replace(hidden_size=48), tokenizer)
    with pytest.raises(FieldError, match="init_from"):
        t2i.start_from(wider, tmp_path / "old")


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


def test_the_evaluator_passes_drawn_scenes_and_fails_wrong_digits() -> None:
    g = torch.Generator().manual_seed(2)
    renderer, classifier = scenes.Renderer(), load_classifier()
    prompts = scenes.held_out_prompts(100, seed=3)
    images = torch.stack([renderer.render(scenes.parse(p), g) for p in prompts])
    assert adherence.adherence(adherence.judge(classifier, prompts, images)) >= 0.97
    wrong = [p.replace(str(scenes.parse(p).items[0].digit), "X", 1) for p in prompts]
    wrong = [w.replace("X", str((scenes.parse(p).items[0].digit + 1) % 10)) for w, p in
             zip(wrong, prompts, strict=True)]  # fmt: skip
    assert adherence.adherence(adherence.judge(classifier, wrong, images)) <= 0.05
    blank = -torch.ones_like(images)
    assert adherence.adherence(adherence.judge(classifier, prompts, blank)) == 0


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
