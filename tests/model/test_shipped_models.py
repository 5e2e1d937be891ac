"""The models this project ships: trained weights that make the digits asked for."""

from __future__ import annotations

import pytest
import torch

from model import registry
from model.training import adherence, scenes
from model.training.bench import counted_flops
from model.training.evaluate import accuracy, load_classifier
from service.request import GenerateParams
from service.settings import SHIPPED_TEXT, SHIPPED_TEXT_VIDEO
from tests.helpers import generate, plan_of

pytestmark = pytest.mark.slow  # the shipped models at their real size
# digits-t2i-skip's adherence on its 20 prompts: measured 75% uncached (15 of 20; 81.5% on the
# bench's 200; the model before its scene-jitter fine-tune: 40%); the floor leaves two prompts'
# room. Issue 20's bar is 80% on the bench's 200.
TEXT_FLOOR = 0.65


def test_default_model_is_the_shipped_skip_dit_with_its_dit_twin() -> None:
    assert registry.default_model() == registry.SHIPPED_DEFAULT
    assert {"digits-skip-dit", "digits-dit"} <= set(registry.shipped_models())
    info = registry.describe()
    skip, card = info.config, info.card
    plain = registry.describe("digits-dit").config
    assert skip.long_skip and not plain.long_skip and not info.random_weights
    assert skip.replace(long_skip=True) == plain.replace(long_skip=True)  # same size: twins
    assert card["steps"] > 0 and card["train_seconds"] > 0


def test_shipped_skip_dit_draws_the_requested_digit() -> None:
    loaded = registry.load()
    classifier = load_classifier()
    requests = [
        GenerateParams(class_label=c, num_images=5, steps=50, seed=1000 + c, cache_policy="none")
        for c in range(10)
    ]
    images = torch.cat([r.images for r in generate(loaded.pipeline, requests)])
    labels = torch.arange(10).repeat_interleave(5)
    assert accuracy(classifier, images, labels) >= 0.9


def test_shipped_video_model_is_a_skip_latte_started_from_the_image_model() -> None:
    """Its quality (per-frame accuracy uncached and under every cache setting the bench runs)
    is held by ``tests/model/test_quality_floors.py``."""
    info = registry.describe("digits-video-skip")
    assert info.kind == "video" and info.card["architecture"] == "Skip-Latte"
    assert info.card["init_from"] == "digits-skip-dit" and not info.random_weights


def test_shipped_dydit_runs_at_its_flops_target() -> None:
    """digits-skip-dydit: digits-skip-dit fine-tuned with DyDiT's routers toward lambda = 0.5
    of the base network's FLOPs: those of a real DDIM-50 run with guidance, counted op by op,
    against the base's. Its accuracy, alone and under Skip-Cache, is held by
    ``tests/model/test_quality_floors.py``."""
    info = registry.describe("digits-skip-dydit")
    assert info.config.dynamic and info.card["from"] == "digits-skip-dit"
    target = info.card["dydit"]["flops_ratio"]
    loaded, base = registry.load("digits-skip-dydit"), registry.load("digits-skip-dit")
    request = GenerateParams(class_label=3, num_images=5, steps=50, seed=1003, cache_policy="none")
    ours, theirs = (plan_of(m.pipeline, request) for m in (loaded, base))
    ratio = counted_flops(loaded.pipeline, ours) / counted_flops(base.pipeline, theirs)
    assert abs(ratio - target) <= 0.05


def test_shipped_text_model_follows_held_out_prompts() -> None:
    """digits-t2i-skip on 20 of the bench's 200 held-out prompts (10 in wordings and 10 with
    (digit, place) combinations training never saw), uncached, 25 flow steps: every stated digit
    at its stated place, judged by the prompt-adherence evaluator. The bench's figures on all
    200 are in docs/bench/t2i; ``tests/model/test_quality_floors.py`` holds every cache
    setting's (its card's default, Skip-Cache N=2, among them) against the uncached images."""
    loaded = registry.load(SHIPPED_TEXT)
    classifier = load_classifier()
    prompts = scenes.held_out_prompts(200)[::10]
    requests = [
        GenerateParams(prompt=p, steps=25, seed=i, cache_policy="none")
        for i, p in enumerate(prompts)
    ]
    images = torch.cat([r.images for r in generate(loaded.pipeline, requests)])
    assert adherence.adherence(adherence.judge(classifier, prompts, images)) >= TEXT_FLOOR


@pytest.mark.parametrize("name", [SHIPPED_TEXT, SHIPPED_TEXT_VIDEO])
def test_shipped_text_models_hold_their_encoder_and_tokenizer_within_30_mb(name: str) -> None:
    info = registry.describe(name)
    root = registry.WEIGHTS_DIR / name
    assert info.conditioning == "text" and info.card["objective"] == "flow"
    assert info.card["default_cache"] == {"policy": "skip_cache", "interval": 2}
    for part in ("text_encoder", "tokenizer"):
        assert (root / info.card[part]).is_dir(), part
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 30 * 2**20


def test_shipped_text_video_model_is_a_text_skip_latte_started_from_the_text_image_model() -> None:
    """Latte's image initialisation: the spatial blocks from digits-t2i-skip. Its quality (frames
    and motion on held-out prompts) is in docs/bench/t2v; ``tests/model/test_quality_floors.py``
    holds every cache setting's frames against the uncached clips."""
    info = registry.describe(SHIPPED_TEXT_VIDEO)
    assert (info.kind, info.num_frames) == ("video", 8) and not info.random_weights
    assert info.card["init_from"] == SHIPPED_TEXT
    assert info.config.long_skip and info.card["architecture"].startswith("Skip-Latte")
