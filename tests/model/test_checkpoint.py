"""Official checkpoints (built here at small size in the official key layout) and our format."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import registry
from model.errors import FieldError
from model.networks.checkpoint import (
    CheckpointError,
    infer_config,
    load_official,
    load_pretrained,
    official_config,
    official_state_dict,
    save_pretrained,
)
from model.networks.skip_dit import DiTConfig, SkipDiT, preset
from tests.helpers import tiny

REPO = Path(__file__).resolve().parents[2]


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


def save_training_checkpoint(path: Path, trained: SkipDiT, ema: SkipDiT) -> None:
    """The official Skip-DiT training checkpoint: {model, ema, opt (AdamW with its state), args}."""
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0)
    for p in trained.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state: step, exp_avg, exp_avg_sq of every parameter
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000)
    torch.save(
        {
            "model": trained.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "args": args,
        },
        path,
    )


def test_skip_dit_release_loads_its_ema_weights(tmp_path: Path) -> None:
    trained, ema = tiny(seed=1, learn_sigma=True), tiny(seed=2, learn_sigma=True)
    path = tmp_path / "DiT-XL-2-skip.pt"
    save_training_checkpoint(path, trained, ema)
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


def test_legacy_format_release_still_loads(tmp_path: Path) -> None:
    plain = tiny(long_skip=False)
    path = tmp_path / "DiT-legacy.pt"
    torch.save(plain.state_dict(), path, _use_new_zipfile_serialization=False)  # cannot be mapped
    loaded = load_official(path)
    for key, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_official_latent_releases_guide_three_channels_ours_all(tmp_path: Path) -> None:
    with torch.device("meta"):
        state = SkipDiT(preset("XL/2")).state_dict()
    assert infer_config(state).guided_channels is None  # shapes alone say nothing of sampling
    assert official_config(state) == preset("XL/2", guided_channels=3)
    save_pretrained(tiny(in_channels=4, guided_channels=3), tmp_path / "m")
    assert load_pretrained(tmp_path / "m")[0].config.guided_channels == 3
    with pytest.raises(ValueError, match="guided_channels"):
        DiTConfig(in_channels=4, guided_channels=5)


def test_config_json_without_guided_channels_loads_as_all_channels(tmp_path: Path) -> None:
    save_pretrained(tiny(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["config"].pop("guided_channels") is None
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))  # as shipped before the field
    assert load_pretrained(tmp_path / "m")[0].config == tiny().config


# Runs in a fresh process. The first random init of a meta tensor imports torch._dynamo (~170
# MiB, once per process; a serving process has it from importing diffusers): done before the
# baseline, so that the figures are what describing and loading the file cost.
_MEASURE_LOAD = """
import json, sys
import torch
from model.networks.checkpoint import load_official, official_config, official_state_dict

def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

torch.nn.init.normal_(torch.empty(1, device="meta"))
base = peak_mib()
config = official_config(official_state_dict(sys.argv[1]))  # what registry.describe reads
described = peak_mib()
model = load_official(sys.argv[1])
checksum = sum(float(v.sum(dtype=torch.float64)) for v in model.state_dict().values())  # reads all
print(json.dumps({"base": base, "described": described, "loaded": peak_mib(), "sum": checksum}))
"""


@pytest.mark.slow
def test_official_training_checkpoint_reads_only_its_ema_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained, ema = SkipDiT(preset("S/2")), SkipDiT(preset("S/2"))
    path = tmp_path / "DiT-S-2-skip.pt"
    save_training_checkpoint(path, trained, ema)  # model + ema + 2 Adam moments: 4x the EMA
    ema_mib = sum(v.numel() * v.element_size() for v in ema.state_dict().values()) / 2**20
    expected = sum(float(v.sum(dtype=torch.float64)) for v in ema.state_dict().values())
    del trained, ema
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE_LOAD, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rss = json.loads(run.stdout)
    assert rss["sum"] == pytest.approx(expected, rel=1e-12)  # the EMA weights, all of them read
    assert rss["described"] - rss["base"] < 0.1 * ema_mib, (rss, ema_mib)
    assert rss["loaded"] - rss["base"] < 1.5 * ema_mib, (rss, ema_mib)


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
