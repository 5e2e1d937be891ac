from __future__ import annotations

import pytest
import torch

from model.networks.skip_dit import DiTConfig, FP32LayerNorm, SkipDiT, preset
from tests.helpers import tiny


def _count(config: DiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in SkipDiT(config).parameters())


def test_parameter_counts_match_the_papers() -> None:
    assert _count(preset("XL/2", long_skip=False)) == 675_129_632
    assert _count(preset("XL/2")) == 712_369_184


def test_each_long_skip_adds_the_papers_parameter_count() -> None:
    per_lsc = (712_369_184 - 675_129_632) // 14
    assert per_lsc == 2_659_968
    skip, plain = preset("digits-tiny"), preset("digits-tiny", long_skip=False)
    d = skip.hidden_size
    assert _count(skip) - _count(plain) == (skip.depth // 2) * (2 * 2 * d + 2 * d * d + d)


def _inputs(model: SkipDiT, batch: int = 3, seed: int = 1):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    return x, t, y


def test_block_j_feeds_block_d_minus_1_minus_j_main_path_first() -> None:
    model = tiny(depth=6)
    d = model.config.depth
    outputs: dict[int, torch.Tensor] = {}
    fused_inputs: dict[int, torch.Tensor] = {}
    for k, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, k=k: outputs.__setitem__(k, out))
    for j, norm in enumerate(model.skip_norms):
        norm.register_forward_pre_hook(lambda m, a, j=j: fused_inputs.__setitem__(j, a[0]))
    _, entering = model.capturing(*_inputs(model), range(d))  # hidden entering each block
    hidden = model.config.hidden_size
    for k in range(d // 2, d):
        cat = fused_inputs[k - d // 2]
        torch.testing.assert_close(cat[..., :hidden], entering[k], rtol=0, atol=0)
        torch.testing.assert_close(cat[..., hidden:], outputs[d - 1 - k], rtol=0, atol=0)


def test_vanilla_dit_has_no_skip_modules_and_differs_from_skip_dit() -> None:
    plain = tiny(long_skip=False)
    assert not any(k.startswith("skip_") for k in plain.state_dict())
    skip = tiny()
    x, t, y = _inputs(skip)
    assert not torch.allclose(plain(x, t, y), skip(x, t, y))


def test_fusion_layernorm_runs_in_fp32_for_bf16_inputs() -> None:
    norm = FP32LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(4, 64) * 30 + 100).to(torch.bfloat16)
    w, b = norm.weight.float(), norm.bias.float()
    ref = torch.nn.functional.layer_norm(x.float(), (64,), w, b, 1e-6)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("long_skip", [True, False])
@pytest.mark.parametrize("depth", [1, 2])
def test_cached_forward_with_the_same_steps_deep_feature_equals_full(
    long_skip: bool, depth: int
) -> None:
    model = tiny(long_skip=long_skip)
    x, t, y = _inputs(model)
    d = model.config.depth
    with torch.no_grad():
        full, captured = model.capturing(x, t, y, [d - depth])
        cached = model.forward_cached(x, t, y, captured[d - depth], depth)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_cached_forward_rejects_depth_beyond_half() -> None:
    model = tiny()
    x, t, y = _inputs(model)
    deep = torch.zeros(3, model.config.num_tokens, model.config.hidden_size)
    with pytest.raises(ValueError, match=r"cache depth must be in \[1, 2\]"):
        model.forward_cached(x, t, y, deep, 3)


def test_config_rejects_odd_depth_with_long_skips() -> None:
    with pytest.raises(ValueError, match="depth"):
        DiTConfig(depth=5)
    DiTConfig(depth=5, long_skip=False)


def test_learn_sigma_doubles_output_channels() -> None:
    model = tiny(learn_sigma=True)
    x, t, y = _inputs(model)
    assert model(x, t, y).shape == (3, 2, 8, 8)
