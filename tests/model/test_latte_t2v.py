"""Latte-T2V-skip (the official Skip-DiT text-to-video model) as ``TextSkipLatte``: a random
state dict in the official key layout loads strictly, its forward equals a reference written
here from the official code's structure (OpenSparseLLMs/Skip-DiT
``text-to-video/models/latte_t2v_skip.py`` with diffusers 0.24's blocks) on the state dict's own
tensors, and Skip-Cache runs on it with the paper's text-to-video settings by default."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import (
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    get_timestep_embedding,
)

from model import cache
from model.cache import POLICIES, Mode
from model.cache.base import CachedBatch
from model.networks.checkpoint import CheckpointError, infer_config
from model.networks.latte_t2v_checkpoint import load_official_t2v
from model.networks.text_latte import PRESETS, TextLatteConfig, TextSkipLatte

PAIRS, WIDTH, HEADS, PATCH, CHANNELS = 4, 32, 2, 2, 4
FRAMES, LATENT, TEXT_DIM, TOKENS = 4, 8, 16, 6

# ----------------------------------------------------------------------------- official layout


def official_state(seed: int = 0, long_skip: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes (diffusers 0.24 modules: biased
    q/k/v, no LayerNorm affines, a tanh-GELU feed-forward; sigma learned: 2x channels out)."""
    g = torch.Generator().manual_seed(seed)
    d = WIDTH
    state: dict[str, torch.Tensor] = {}

    def linear(name: str, out: int, inp: int) -> None:
        state[f"{name}.weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1

    state["pos_embed.proj.weight"] = torch.randn(d, CHANNELS, PATCH, PATCH, generator=g) * 0.3
    state["pos_embed.proj.bias"] = torch.randn(d, generator=g) * 0.1
    linear("adaln_single.emb.timestep_embedder.linear_1", d, 256)
    linear("adaln_single.emb.timestep_embedder.linear_2", d, d)
    linear("adaln_single.linear", 6 * d, d)
    linear("caption_projection.linear_1", d, TEXT_DIM)
    linear("caption_projection.linear_2", d, d)
    state["caption_projection.y_embedding"] = torch.randn(TOKENS, TEXT_DIM, generator=g)
    for kind in ("transformer_blocks", "temporal_transformer_blocks"):
        for i in range(PAIRS):
            block = f"{kind}.{i}"
            attentions = ("attn1", "attn2") if kind == "transformer_blocks" else ("attn1",)
            for attn in attentions:
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    linear(f"{block}.{attn}.{proj}", d, d)
            linear(f"{block}.ff.net.0.proj", 4 * d, d)
            linear(f"{block}.ff.net.2", d, 4 * d)
            state[f"{block}.scale_shift_table"] = torch.randn(6, d, generator=g) / math.sqrt(d)
    if long_skip:
        for j in range(PAIRS // 2):
            state[f"skip_norms.{j}.weight"] = 1 + 0.1 * torch.randn(2 * d, generator=g)
            state[f"skip_norms.{j}.bias"] = 0.1 * torch.randn(2 * d, generator=g)
            linear(f"skip_linears.{j}.linear", d, 2 * d)
    state["scale_shift_table"] = torch.randn(2, d, generator=g) / math.sqrt(d)
    linear("proj_out", PATCH * PATCH * 2 * CHANNELS, d)
    return state


def load(state: dict[str, torch.Tensor]) -> TextSkipLatte:
    return load_official_t2v(state, num_heads=HEADS, input_size=LATENT, num_frames=FRAMES)


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, FRAMES, LATENT, LATENT, generator=g)  # (B, C, F, H, W)
    t = torch.tensor([999.0, 37.0, 500.0][:batch])
    text = torch.randn(batch, TOKENS, TEXT_DIM, generator=g)  # the text encoder's output
    mask = torch.ones(batch, TOKENS, dtype=torch.bool)
    mask[-1, TOKENS - 2 :] = False  # the last prompt is 2 tokens shorter
    return x, t, text, mask


# ----------------------------------------------------------------------------- reference


def reference_forward(
    s: dict[str, torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``LatteT2V_skip.forward`` (sampling: no image joint training, temporal attention on)
    over the state dict's tensors, in its order of operations; einops as reshapes.
    x (B, C, F, H, W), t (B,), text (B, L, C_text), mask (B, L) 1 = keep -> (B, C_out, F, H, W)."""
    b, ch, f, hh, ww = x.shape
    d, p = WIDTH, PATCH
    lin = lambda h, n: F.linear(h, s[f"{n}.weight"], s[f"{n}.bias"])  # noqa: E731
    ln = lambda h: F.layer_norm(h, (d,), eps=1e-6)  # noqa: E731  # elementwise_affine=False

    def attention(h, context, n, bias=None):  # diffusers Attention, AttnProcessor
        q, k, v = lin(h, f"{n}.to_q"), lin(context, f"{n}.to_k"), lin(context, f"{n}.to_v")
        split = lambda z: z.reshape(z.shape[0], -1, HEADS, d // HEADS).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) * (d // HEADS) ** -0.5
        if bias is not None:
            scores = scores + bias[:, None]  # (rows, 1, 1, L) over heads and queries
        out = scores.softmax(-1) @ split(v)
        return lin(out.transpose(1, 2).reshape(h.shape[0], -1, d), f"{n}.to_out.0")

    def block(h, t6, n, context=None, bias=None):  # BasicTransformerBlock(_), ada_norm_single
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            s[f"{n}.scale_shift_table"][None] + t6.reshape(h.shape[0], 6, -1)
        ).chunk(6, dim=1)
        norm = ln(h) * (1 + scale_msa) + shift_msa
        h = gate_msa * attention(norm, norm, f"{n}.attn1") + h
        if context is not None:  # spatial blocks: PixArt's cross-attention, no norm
            h = attention(h, context, f"{n}.attn2", bias) + h
        norm = ln(h) * (1 + scale_mlp) + shift_mlp
        ff = lin(F.gelu(lin(norm, f"{n}.ff.net.0.proj"), approximate="tanh"), f"{n}.ff.net.2")
        return gate_mlp * ff + h

    # encoder_attention_mask -> bias, repeated per frame
    bias = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1).repeat_interleave(f, 0)
    h = x.permute(0, 2, 1, 3, 4).reshape(b * f, ch, hh, ww)  # 'b c f h w -> (b f) c h w'
    h = F.conv2d(h, s["pos_embed.proj.weight"], s["pos_embed.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2)  # (b f) t d
    grid = hh // p
    # PatchEmbed(sample_size=LATENT): base_size = grid, interpolation_scale = max(8 // 64, 1)
    h = h + get_2d_sincos_pos_embed(d, grid, base_size=grid, interpolation_scale=1).float()
    n = h.shape[1]
    freq = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    emb = lin(
        F.silu(lin(freq, "adaln_single.emb.timestep_embedder.linear_1")),
        "adaln_single.emb.timestep_embedder.linear_2",
    )
    t6 = lin(F.silu(emb), "adaln_single.linear")  # (B, 6D)
    caption = lin(
        F.gelu(lin(text, "caption_projection.linear_1"), approximate="tanh"),
        "caption_projection.linear_2",
    )
    caption_spatial = caption.repeat_interleave(f, 0)  # 'b t d -> (b f) t d'
    t_spatial, t_temp = t6.repeat_interleave(f, 0), t6.repeat_interleave(n, 0)
    temp_pos = get_1d_sincos_pos_embed_from_grid(d, torch.arange(f).unsqueeze(1)).float()
    half = PAIRS // 2  # the official 14 of 28 pairs
    skips = []
    for i in range(PAIRS):
        if i >= half:
            cat = torch.cat([h, skips.pop()], dim=-1)
            j = i - half
            cat = F.layer_norm(
                cat, (2 * d,), s[f"skip_norms.{j}.weight"], s[f"skip_norms.{j}.bias"], eps=1e-6
            )
            h = lin(cat, f"skip_linears.{j}.linear")
        h = block(h, t_spatial, f"transformer_blocks.{i}", caption_spatial, bias)
        h = h.reshape(b, f, n, d).transpose(1, 2).reshape(b * n, f, d)  # '(b f) t d -> (b t) f d'
        if i == 0 and f > 1:
            h = h + temp_pos
        h = block(h, t_temp, f"temporal_transformer_blocks.{i}")
        h = h.reshape(b, n, f, d).transpose(1, 2).reshape(b * f, n, d)  # '(b t) f d -> (b f) t d'
        if i < half:
            skips.append(h)
    emb_spatial = emb.repeat_interleave(f, 0)
    shift, scale = (s["scale_shift_table"][None] + emb_spatial[:, None]).chunk(2, dim=1)
    h = lin(ln(h) * (1 + scale) + shift, "proj_out")
    out_ch = h.shape[-1] // (p * p)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, grid, grid, p, p, out_ch))
    h = h.reshape(-1, out_ch, grid * p, grid * p)
    return h.reshape(b, f, out_ch, hh, ww).transpose(1, 2)  # '(b f) c h w -> b c f h w'


# ----------------------------------------------------------------------------- loading


def test_official_state_dict_loads_and_its_forward_is_the_official_forward() -> None:
    state = official_state()
    model = load(state)
    c = model.config
    assert (c.units, c.hidden_size, c.num_heads, c.in_channels, c.out_channels) == (
        PAIRS,
        WIDTH,
        HEADS,
        CHANNELS,
        2 * CHANNELS,
    )
    assert (c.text_dim, c.max_tokens, c.num_frames, c.input_size) == (
        TEXT_DIM,
        TOKENS,
        FRAMES,
        LATENT,
    )
    assert c.long_skip and c.file_kind == "text-video" and c.kind == "video"
    x, t, text, mask = inputs()
    with torch.no_grad():
        ours = model(x, t, model.encode_text(text, mask))
        theirs = reference_forward(state, x, t, text, mask)
    assert ours.shape == (2, 2 * CHANNELS, FRAMES, LATENT, LATENT)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_training_checkpoint_file_loads_its_ema(tmp_path: Path) -> None:
    ema, trained = official_state(seed=0), official_state(seed=1)
    path = tmp_path / "Latte-skip.pt"
    torch.save({"model": trained, "ema": ema}, path)  # what the official training saves
    loaded = load_official_t2v(path, num_heads=HEADS, input_size=LATENT, num_frames=FRAMES)
    x, t, text, mask = inputs()
    with torch.no_grad():
        ours = loaded(x, t, loaded.encode_text(text, mask))
        torch.testing.assert_close(ours, reference_forward(ema, x, t, text, mask))
    with pytest.raises(CheckpointError, match="load_official_t2v"):
        infer_config(ema)  # the class-model loader points at this one


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_a_file_without_ema_loads_its_one_state_dict(tmp_path: Path, wrapper: str) -> None:
    state = official_state(seed=2)
    path = tmp_path / "t2v.pt"
    torch.save({wrapper: state}, path)
    loaded = load_official_t2v(path, num_heads=HEADS, input_size=LATENT, num_frames=FRAMES)
    x, t, text, mask = inputs()
    with torch.no_grad():
        ours = loaded(x, t, loaded.encode_text(text, mask))
        torch.testing.assert_close(ours, reference_forward(state, x, t, text, mask))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            lambda s: [
                s.pop(k)
                for k in ("temporal_transformer_blocks.1.attn1.to_k.bias", "skip_norms.1.weight")
            ],
            "missing keys ['skip_norms.1.weight', 'temporal_transformer_blocks.1.attn1.to_k.bias']",
        ),
        (
            lambda s: s.__setitem__("transformer_blocks.2.norm1.weight", torch.ones(WIDTH)),
            "unexpected keys ['transformer_blocks.2.norm1.weight']",
        ),
        (
            lambda s: s.__setitem__("transformer_blocks.0.attn2.to_k.weight", torch.zeros(32, 8)),
            "mis-shaped keys ['transformer_blocks.0.attn2.to_k.weight: "
            "checkpoint (32, 8) != model (32, 32)']",
        ),
    ],
)
def test_wrong_or_missing_keys_fail_naming_each_key(mutate, needle: str) -> None:
    state = official_state()
    mutate(state)
    with pytest.raises(CheckpointError) as err:
        load(state)
    assert needle in str(err.value)


def test_heads_are_required_where_no_preset_tells_them() -> None:
    with pytest.raises(CheckpointError, match="num_heads"):
        load_official_t2v(official_state())
    with torch.device("meta"):
        full = TextSkipLatte(PRESETS["Latte-T2V-XL/2"]())
    assert full.config.units == 28 and full.config.num_heads == 16


# ----------------------------------------------------------------------------- text and cache


def test_text_is_projected_once_per_request_not_per_step() -> None:
    model = load(official_state())
    x, t, text, mask = inputs()
    calls: list[int] = []
    handle = model.y_embedder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            context = model.encode_text(text, mask)
            for step in range(3):
                model(x, t - 100 * step, context)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert len(context.kv) == PAIRS  # keys and values of each spatial block, none temporal


def test_cached_step_at_k1_runs_only_the_first_and_last_pair() -> None:
    model = load(official_state())
    x, t, text, mask = inputs()
    ran: list[int] = []
    fused: list[int] = []
    handles = [
        b.register_forward_hook(lambda m, a, o, k=k: ran.append(k))
        for k, b in enumerate(model.blocks)
    ]
    handles += [
        n.register_forward_hook(lambda m, a, o, j=j: fused.append(j))
        for j, n in enumerate(model.skip_norms)
    ]
    try:
        with torch.no_grad():
            context = model.encode_text(text, mask)
            _, captured = model.capturing(x, t, context, [PAIRS - 1])
            ran.clear(), fused.clear()
            model.forward_cached(x, t, context, captured[PAIRS - 1], 1)
    finally:
        for h in handles:
            h.remove()
    last = 2 * (PAIRS - 1)
    assert ran == [0, 1, last, last + 1]  # pair 0 (spatial, temporal), then pair P-1
    assert fused == [PAIRS // 2 - 1]  # pair P-1 fuses pair 0's output through the last LSC


def sample(model: TextSkipLatte, policy: str, **params) -> tuple[torch.Tensor, list[Mode]]:
    """Ten steps of a plain update x -= 0.1 * eps through one request's cache."""
    x, _, text, mask = inputs(batch=1)
    request = cache.build(policy, model.config, **params)
    modes = []
    with torch.no_grad():
        context = model.encode_text(text, mask)
        for step, t in enumerate(torch.linspace(999, 0, 10).round()):
            tt = t[None]
            mode = request.decide(step, float(t))
            if mode is Mode.FULL:
                out, captured = model.capturing(
                    x, tt, context, request.capture_blocks(model.config)
                )
                request.policy.on_full(request.config, request.state, captured)
            else:
                batch = CachedBatch(x, tt, context, [request.state])
                out = request.policy.forward_cached(model, batch, request.config)
            modes.append(mode)
            x = x - 0.1 * out[:, :CHANNELS]
    return x, modes


def test_skip_cache_at_interval_1_is_no_cache_and_caches_at_2() -> None:
    model = load(official_state())
    plain, _ = sample(model, "none")
    one, modes_one = sample(model, "skip_cache", interval=1)
    assert set(modes_one) == {Mode.FULL}
    torch.testing.assert_close(one, plain, rtol=0, atol=0)
    two, modes_two = sample(model, "skip_cache", interval=2)
    # t = 999, 888, 777 >= 700 and t = 0 <= 50 full; between, every other step cached
    assert [m is Mode.CACHED for m in modes_two] == [False] * 3 + [True, False] * 3 + [False]
    assert not torch.allclose(two, plain)


def test_skip_cache_defaults_are_the_papers_text_to_video_ones() -> None:
    for config in (PRESETS["Latte-T2V-XL/2"](), load(official_state()).config):
        default = POLICIES["skip_cache"].default_config(config)
        assert (default.interval, default.depth, default.t_start, default.t_end) == (
            2,
            1,
            700.0,
            50.0,
        )
    assert isinstance(load(official_state()).config, TextLatteConfig)
