"""LoRA adapters of a class-conditional image (Skip-)DiT, many in one batch.

An adapter holds, per targeted linear ``W`` (out, in), a low-rank pair A (r, in), B (out, r) and
adds ``scale * (alpha / r) * B A x`` to ``W x + b``. Targets are named by the linear's module
path: every block's attention ``qkv`` and ``proj``, its MLP ``fc1`` and ``fc2``, and each long
skip's ``skip_linears.{j}.linear`` (which reads the fused, normalised ``LN(cat[x, skip])``).

One step batch may hold rows of several adapters and rows of none (batched multi-LoRA serving,
S-LoRA / punica style): the base matmul runs once for all rows, then each adapter's rows,
gathered, add their low-rank product (``applied``). Rows of no adapter get the base output as it
is. The network holds no adapter: ``applied`` attaches the batch's adapters from outside for one
forward (forward hooks on the targeted linears and, for the long skips, a wrapper of
``SkipDiT.fuse`` that also serves the fused Triton kernel, which never calls the linear) and
removes them after. Captured steps (``model.sampling.graphs``) replay no Python hook: groups
holding an adapter row run eagerly.

On disk, a directory: ``adapter.json`` (``name``, ``base`` model, ``rank``, ``alpha``,
``targets``, and a card: the training command, steps, measured effect) and
``adapter.safetensors`` (``{target}.lora_A`` (r, in), ``{target}.lora_B`` (out, r)). Loading is
strict against the base network: an unknown target, a missing or extra tensor, a wrong shape
raises ``AdapterError`` naming the keys.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.networks.skip_dit import SkipDiT

CARD_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
MAX_SCALE = 2.0  # the largest per-request scale a request may ask for


class AdapterError(ValueError):
    """An adapter does not fit its base network (or its files are malformed); names the keys."""


def targets_of(model: SkipDiT) -> dict[str, nn.Linear]:
    """Every linear an adapter may target, by module path: the blocks' attention qkv / proj and
    MLP fc1 / fc2, the long skips' linears."""
    if model.config.kind != "image" or model.config.conditioning != "class":
        raise AdapterError(
            f"adapters serve class-conditional image networks, not {type(model).__name__}"
        )
    names = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        block = name.startswith("blocks.") and name.split(".", 2)[-1] in names
        skip = name.startswith("skip_linears.") and name.endswith(".linear")
        if (block or skip) and isinstance(module, nn.Linear):
            found[name] = module
    return found


def _skip_target(j: int) -> str:
    return f"skip_linears.{j}.linear"


@dataclass(frozen=True, eq=False)
class LoRA:
    """One adapter: target name -> (A (r, in), B (out, r)); adds ``(alpha / rank) B A x``."""

    name: str
    base: str  # the model it was trained on
    rank: int
    alpha: float
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    card: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> list[torch.Tensor]:
        """A and B of every target (what training optimises)."""
        return [t for pair in self.weights.values() for t in pair]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for target, (a, b) in sorted(self.weights.items()):
            out[f"{target}.lora_A"] = a.detach().contiguous().cpu()
            out[f"{target}.lora_B"] = b.detach().contiguous().cpu()
        return out

    def to(self, device: torch.device, dtype: torch.dtype) -> LoRA:
        moved = {
            k: (a.to(device, dtype), b.to(device, dtype)) for k, (a, b) in self.weights.items()
        }
        return LoRA(self.name, self.base, self.rank, self.alpha, moved, self.card)


def fresh(
    model: SkipDiT,
    name: str,
    base: str,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> LoRA:
    """A new adapter of ``model``: A uniform as nn.Linear's default init (kaiming, a=sqrt(5)),
    B zero, so it starts as the base network exactly. ``targets`` None: all of ``targets_of``.
    Its tensors require grad."""
    linears = targets_of(model)
    chosen = sorted(linears) if targets is None else list(targets)
    _check_targets(chosen, linears)
    weights = {}
    for target in chosen:
        w = linears[target].weight  # (out, in)
        bound = 1 / math.sqrt(w.shape[1])
        a = (torch.rand(rank, w.shape[1], generator=generator) * 2 - 1) * bound  # (r, in)
        b = torch.zeros(w.shape[0], rank)  # (out, r)
        weights[target] = (a.requires_grad_(), b.requires_grad_())
    return LoRA(name, base, rank, float(alpha if alpha is not None else rank), weights)


def _check_targets(targets: Sequence[str], linears: Mapping[str, nn.Linear]) -> None:
    unknown = sorted(set(targets) - set(linears))
    if unknown:
        raise AdapterError(f"unknown targets {unknown}: the base network's are {sorted(linears)}")


def save(lora: LoRA, directory: Path, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``lora`` to ``directory`` (``adapter.json`` + ``adapter.safetensors``)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora.state_dict(), str(directory / WEIGHTS_FILE))
    meta = {
        "name": lora.name,
        "base": lora.base,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "targets": sorted(lora.weights),
        "card": dict(card if card is not None else lora.card),
    }
    (directory / CARD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    """``adapter.json`` of ``directory``: name, base, rank, alpha, targets, card."""
    path = directory / CARD_FILE
    if not path.is_file():
        raise AdapterError(f"{directory}: no {CARD_FILE}")
    meta = json.loads(path.read_text())
    missing = sorted({"name", "base", "rank", "alpha", "targets"} - set(meta))
    if missing:
        raise AdapterError(f"{path}: missing fields {missing}")
    return dict(meta)


def load(directory: Path, model: SkipDiT) -> LoRA:
    """The adapter in ``directory`` checked against ``model`` (its targets' shapes), on the
    model's device and dtype. Raises AdapterError naming every unknown target and every
    missing, unexpected or mis-shaped tensor."""
    meta = read_meta(directory)
    linears = targets_of(model)
    targets, rank = list(meta["targets"]), int(meta["rank"])
    _check_targets(targets, linears)
    state = load_file(str(directory / WEIGHTS_FILE))
    shapes = {}
    for target in targets:
        out_features, in_features = linears[target].weight.shape
        shapes[f"{target}.lora_A"] = (rank, in_features)
        shapes[f"{target}.lora_B"] = (out_features, rank)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    misshaped = [
        f"{k}: adapter {tuple(state[k].shape)} != expected {shapes[k]}"
        for k in sorted(set(shapes) & set(state))
        if tuple(state[k].shape) != shapes[k]
    ]
    if missing or unexpected or misshaped:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        parts += [f"mis-shaped {misshaped}"] if misshaped else []
        raise AdapterError(f"adapter {meta['name']} ({directory}): " + "; ".join(parts))
    param = next(model.parameters())
    weights = {
        t: (state[f"{t}.lora_A"].to(param.device, param.dtype),
            state[f"{t}.lora_B"].to(param.device, param.dtype))
        for t in targets
    }  # fmt: skip
    return LoRA(
        meta["name"], meta["base"], rank, float(meta["alpha"]), weights, meta.get("card", {})
    )


# ----------------------------------------------------------------------------- a batch's rows


@dataclass(frozen=True)
class Choice:
    """A request's adapter and the scale it asked for."""

    lora: LoRA
    scale: float = 1.0


# Batch row indices (n,) -> a target's input at those rows (n, ..., in).
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Group:
    lora: LoRA
    index: torch.Tensor  # (n,) the batch rows of this adapter
    scale: torch.Tensor  # (n,) each row's scale times the adapter's alpha / rank


@dataclass(frozen=True)
class Rows:
    """Which rows of a batch carry which adapter: rows grouped by adapter, rows of none in no
    group. ``rows``: the batch size it was made for."""

    rows: int
    groups: tuple[_Group, ...]

    @classmethod
    def of(cls, parts: Sequence[tuple[Choice | None, int]], device: torch.device) -> Rows:
        """The rows of a batch made of ``parts`` in order: (choice or None, rows) each."""
        by_lora: dict[int, tuple[LoRA, list[int], list[float]]] = {}
        offset = 0
        for choice, n in parts:
            if choice is not None:
                entry = by_lora.setdefault(id(choice.lora), (choice.lora, [], []))
                entry[1].extend(range(offset, offset + n))
                entry[2].extend([choice.scale * choice.lora.scaling] * n)
            offset += n
        groups = tuple(
            _Group(
                lora,
                torch.tensor(index, dtype=torch.long, device=device),
                torch.tensor(scale, dtype=torch.float32, device=device),
            )
            for lora, index, scale in by_lora.values()
        )
        return cls(offset, groups)

    def add(self, target: str, gather: Gather, out: torch.Tensor) -> torch.Tensor:
        """``out`` (rows, ..., out) plus each adapter's low-rank term of ``target`` on its rows;
        ``gather(index)`` gives the target's input at those rows (n, ..., in). Rows of no
        adapter keep ``out`` as it is."""
        if out.shape[0] != self.rows:
            raise RuntimeError(f"adapter rows: batch of {out.shape[0]} rows, made for {self.rows}")
        for group in self.groups:
            pair = group.lora.weights.get(target)
            if pair is None:
                continue
            xs = gather(group.index)  # (n, ..., in): this adapter's rows
            a, b = (w.to(xs.dtype) for w in pair)
            delta = (xs @ a.T) @ b.T  # (n, ..., out)
            scale = group.scale.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))
            out = out.index_add(0, group.index, (delta * scale).to(out.dtype))
        return out

    def targets(self) -> set[str]:
        return {t for group in self.groups for t in group.lora.weights}


@contextlib.contextmanager
def applied(model: SkipDiT, rows: Rows) -> Iterator[None]:
    """Within the block, ``model``'s forwards add the adapters of ``rows`` to its targeted
    linears, row by row; after it, the network is as it was. One batch at a time per network
    (the engine steps a network from one thread)."""
    if "fuse" in vars(model):
        raise RuntimeError("adapters are already applied to this network")
    wanted = rows.targets()
    half = model.config.units // 2
    skips = {_skip_target(j) for j in range(half)} if model.config.long_skip else set()
    handles = []
    for name, linear in targets_of(model).items():
        if name in wanted and name not in skips:
            handles.append(linear.register_forward_hook(_hook(rows, name)))
    if wanted & skips:
        base_fuse = model.fuse

        def fuse(k: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            out = base_fuse(k, x, skip)  # (B, T, D): the kernel's or torch's
            j = k - half
            norm = model.skip_norms[j]

            def normalised(index: torch.Tensor) -> torch.Tensor:  # the adapter rows only
                pair = torch.cat([x.index_select(0, index), skip.index_select(0, index)], dim=-1)
                return norm(pair)  # (n, T, 2D)

            return rows.add(_skip_target(j), normalised, out)

        setattr(model, "fuse", fuse)  # noqa: B010 (an instance attribute over the method)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if "fuse" in vars(model):
            delattr(model, "fuse")


def _hook(rows: Rows, target: str) -> Any:
    def hook(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor:
        x = inputs[0]  # (rows, ..., in)
        return rows.add(target, lambda index: x.index_select(0, index), out)

    return hook
