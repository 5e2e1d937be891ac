"""Official checkpoints (built here at small size in the official key layout) and our format."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from model import registry
from model.checkpoint import (
    CheckpointError,
    infer_config,
    load_official,
    load_pretrained,
    official_state_dict,
    save_pretrained,
)
from model.errors import FieldError
from model.skip_dit import SkipDiT, preset
from tests.conftest import tiny


def official_keys(depth: int, long_skip: bool) -> set[str]:
    """The key names of the official DiT / Skip-DiT releases, written out independently."""
    wb = ("weight", "bias")
    keys = {"pos_embed", "y_embedder.embedding_table.weight"}
    keys |= {f"x_embedder.proj.{p}" for p in wb}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in wb}
    keys |= {f"final_layer.{m}.{p}" for m in ("adaLN_modulation.1", "linear") for p in wb}
    for i in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{m}.{p}" for p in wb}
    if long_skip:
        for j in range(depth // 2):
            keys |= {f"skip_norms.{j}.{p}" for p in wb}
            keys |= {f"skip_linears.{j}.linear.{p}" for p in wb}
    return keys


@pytest.mark.parametrize("long_skip", [True, False])
def test_network_uses_the_official_key_layout(long_skip: bool) -> None:
    model = tiny(long_skip=long_skip)
    assert set(model.state_dict()) == official_keys(model.config.depth, long_skip)


def test_skip_dit_release_loads_its_ema_weights(tmp_path: Path) -> None:
    trained, ema = tiny(seed=1, learn_sigma=True), tiny(seed=2, learn_sigma=True)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    path = tmp_path / "DiT-XL-2-skip.pt"
    args = argparse.Namespace(model="DiT-XL/2", image_size=16, num_classes=10)
    torch.save(
        {
            "model": trained.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "args": args,
        },
        path,
    )
    loaded = load_official(path, num_heads=2)
    assert loaded.config == ema.config
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), ema(x, t, y), rtol=0, atol=0)


def test_plain_dit_release_loads(tmp_path: Path) -> None:
    plain = tiny(long_skip=False, learn_sigma=True, hidden_size=48, num_heads=3)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(plain.state_dict(), path)
    with pytest.raises(CheckpointError, match="num_heads"):
        load_official(path)  # no preset has this depth and width: heads cannot be inferred
    loaded = load_official(path, num_heads=3)
    assert loaded.config == plain.config
    assert not loaded.config.long_skip and loaded.config.learn_sigma


@pytest.mark.parametrize("long_skip", [True, False])
@pytest.mark.parametrize("name", ["XL/2", "S/2"])
def test_config_is_read_off_release_shapes(name: str, long_skip: bool) -> None:
    config = preset(name, long_skip=long_skip)
    with torch.device("meta"):
        state = SkipDiT(config).state_dict()
    assert infer_config(state) == config


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s.pop("skip_norms.0.bias"), "missing keys ['skip_norms.0.bias']"),
        (lambda s: s.__setitem__("blocks.9.attn.qkv.bias", torch.zeros(3)), "blocks.9"),
        (
            lambda s: s.__setitem__("skip_linears.1.linear.weight", torch.zeros(32, 32)),
            "mis-shaped keys ['skip_linears.1.linear.weight: "
            "checkpoint (32, 32) != model (32, 64)']",
        ),
        (
            lambda s: s.__setitem__(
                "skip_linears.0.lin.weight", s.pop("skip_linears.0.linear.weight")
            ),
            "unexpected keys ['skip_linears.0.lin.weight']",
        ),
    ],
)
def test_mismatched_checkpoint_names_the_keys(tmp_path: Path, mutate, needle: str) -> None:
    state = tiny().state_dict()
    mutate(state)
    path = tmp_path / "bad.pt"
    torch.save({"ema": state, "model": state, "opt": {}, "args": argparse.Namespace()}, path)
    with pytest.raises(CheckpointError) as err:
        load_official(path, num_heads=2)
    assert needle in str(err.value)


def test_non_checkpoint_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="neither a state dict"):
        official_state_dict(path)


def test_our_format_round_trips_with_its_card(tmp_path: Path) -> None:
    model = tiny()
    save_pretrained(model, tmp_path / "m", card={"default_guidance": 3.0, "steps": 123})
    loaded, card = load_pretrained(tmp_path / "m")
    assert card["steps"] == 123 and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    via_registry = registry.load(str(tmp_path / "m"))
    assert via_registry.pipeline.default_guidance == 3.0 and not via_registry.random_weights


def test_unknown_model_name_is_a_field_error() -> None:
    with pytest.raises(FieldError) as err:
        registry.load("no-such-model")
    assert err.value.field == "model" and "random:digits-small" in str(err.value)
