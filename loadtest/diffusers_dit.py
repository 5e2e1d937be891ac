"""diffusers' ``DiTTransformer2DModel`` in our DiT's shape (``like``), or holding our vanilla
DiT's weights key by key (``convert``): the peer network the loadtest benchmarks put beside ours."""

from __future__ import annotations

import torch

from model.networks.skip_dit import DiTConfig, SkipDiT


def like(cfg: DiTConfig) -> torch.nn.Module:
    """A randomly initialised ``DiTTransformer2DModel`` of the config's shape."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
    )


def convert(network: SkipDiT) -> torch.nn.Module:
    """Our vanilla DiT as diffusers' ``DiTTransformer2DModel`` holding the same weights."""
    cfg = network.config
    if cfg.long_skip or cfg.learn_sigma:
        raise ValueError("a vanilla DiT predicting noise only converts")
    dit = like(cfg)
    ours = network.state_dict()
    theirs: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
        "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": ours["final_layer.linear.weight"],
        "proj_out_2.bias": ours["final_layer.linear.bias"],
    }
    for i in range(cfg.depth):
        mine, block = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = block + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            for kind in ("weight", "bias"):
                theirs[f"{emb}timestep_embedder.{name}.{kind}"] = ours[f"t_embedder.mlp.{j}.{kind}"]
        theirs[emb + "class_embedder.embedding_table.weight"] = ours[
            "y_embedder.embedding_table.weight"
        ]
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{mine}attn.qkv.{kind}"].chunk(3)
            theirs |= {
                f"{block}attn1.to_q.{kind}": q,
                f"{block}attn1.to_k.{kind}": k,
                f"{block}attn1.to_v.{kind}": v,
                f"{block}attn1.to_out.0.{kind}": ours[f"{mine}attn.proj.{kind}"],
                f"{block}ff.net.0.proj.{kind}": ours[f"{mine}mlp.fc1.{kind}"],
                f"{block}ff.net.2.{kind}": ours[f"{mine}mlp.fc2.{kind}"],
                f"{block}norm1.linear.{kind}": ours[f"{mine}adaLN_modulation.1.{kind}"],
            }
    dit.load_state_dict(theirs, strict=True)
    for block in dit.transformer_blocks:  # the DiT paper's timestep frequencies (shift 0)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    with torch.no_grad():
        dit.pos_embed.pos_embed.copy_(ours["pos_embed"])  # a buffer, not in the state dict
    return dit.eval()
