"""The contract every cache policy meets, and the per-request handle that binds one to a request.

A policy never lives on the network. Per request it keeps a state object (created by
``new_state``); each step the sampler asks ``decide`` for the mode, runs every FULL row of the
batch in one plain forward (capturing the hidden states policies asked for) and hands each
request its captured rows through ``on_full``; CACHED rows are grouped by ``cached_group_key``
and each group runs through the policy's ``run_cached``, which hands the policy's own
``forward_cached`` the group as one ``CachedBatch``.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from model.errors import FieldError
from model.networks.conditions import Condition
from model.networks.skip_dit import DiTConfig, SkipDiT

IMAGE_AND_VIDEO = frozenset({"image", "video"})


class Mode(enum.StrEnum):
    FULL = "full"
    CACHED = "cached"


class PolicyConfig(Protocol):
    """What every policy's config (a frozen dataclass) has: its range check."""

    def check(self) -> None: ...


ConfigT = TypeVar("ConfigT", bound=PolicyConfig)  # a policy's config
StateT = TypeVar("StateT")  # a policy's per-request state


class CachePolicy(ABC, Generic[ConfigT, StateT]):
    """Stateless strategy object; all request state lives in the object ``new_state`` returns."""

    name: str
    # Frozen dataclass with the paper's defaults; its ``check()`` raises FieldError naming the
    # parameter (the policy's own name: ``interval``, ``depth``...) for a value out of range.
    config_cls: ClassVar[type]
    state_cls: ClassVar[type]  # per-request state with reset()
    # Pure rule (step, t, config, state) -> Mode; a staticmethod of the policy's module function.
    decide_rule: ClassVar[staticmethod[[int, float, Any, Any], Mode]]
    # Model kinds (``config.kind``: image, video) the policy runs on; ``cache.build`` refuses
    # the others with ``refusal``, the reason.
    kinds: ClassVar[frozenset[str]] = IMAGE_AND_VIDEO
    refusal: ClassVar[str] = ""
    # Networks (``config.file_kind``) of an accepted kind that the policy still cannot run
    # on, each with the reason (what their interface lacks).
    refused_networks: ClassVar[dict[str, str]] = {}

    def refusal_for(self, model: DiTConfig) -> str | None:
        """Why the policy cannot run on ``model`` (a whole sentence), or None where it can."""
        if model.file_kind in self.refused_networks:
            why = self.refused_networks[model.file_kind]
            return f"{self.name!r} does not apply to {model.file_kind} models: {why}"
        if model.kind not in self.kinds:
            return f"{self.name!r} does not apply to {model.kind} models: {self.refusal}"
        return None

    def applies_to(self, model: DiTConfig) -> bool:
        return self.refusal_for(model) is None

    def default_config(self, model: DiTConfig, **overrides: Any) -> ConfigT:
        """The paper's defaults for this model with ``overrides`` applied; policies whose
        bounds depend on the model (a depth of at most half its units) check them here.
        ``configure`` is what a run's config comes from: it also checks the values."""
        return dataclasses.replace(self.config_cls(), **overrides)

    def configure(self, model: DiTConfig, **params: Any) -> ConfigT:
        """The config one run of this policy on ``model`` uses: built and checked, once. Raises
        FieldError naming the parameter (``policy`` where the policy cannot run on it)."""
        refusal = self.refusal_for(model)
        if refusal is not None:
            raise FieldError("policy", refusal)
        config = self.default_config(model, **params)
        config.check()
        return config

    def captured_modes(self, config: ConfigT) -> frozenset[Mode]:
        """The step modes a captured graph may run for a request with ``config`` (the runner of
        ``model.sampling.graphs`` has a plain full forward and Skip-Cache's cached forward). A
        policy whose forward decides inside it (adaptive thresholds) or has its own cached
        forward declares none: its steps run eagerly. Default: none."""
        return frozenset()

    def new_state(self) -> StateT:
        return self.state_cls()

    def decide(self, step: int, t: float, config: ConfigT, state: StateT) -> Mode:
        """The mode of step ``step`` (0-based) at scheduler timestep ``t``.

        Timestep windows (``t_start``, ``t_end``) are on the timestep scale the sampler feeds
        the network, 1000 = pure noise, 0 = clean, for DDPM-family and flow alike (flow: sigma
        * 1000, a float, not truncated)."""
        return type(self).decide_rule(step, t, config, state)

    def planned_modes(self, config: ConfigT, timesteps: Sequence[int]) -> list[Mode]:
        """The modes a fresh request will run, for time estimates. Static policies are exact;
        this default, every step FULL, is the upper bound a dynamic policy (fbcache) gives."""
        return [Mode.FULL] * len(timesteps)

    def capture_blocks(self, config: ConfigT, model: DiTConfig) -> tuple[Hashable, ...]:
        """Capture keys (``SkipDiT.run_blocks``: a unit index for the hidden state entering it,
        ``(branch, block)`` for branch outputs) a full step must hand to ``on_full``."""
        return ()

    def on_full(
        self, config: ConfigT, state: StateT, captured: dict[Hashable, torch.Tensor]
    ) -> None:
        """Called after a full step with this request's rows of the captured hidden states."""

    def cached_group_key(self, config: ConfigT) -> Hashable:
        """Cached rows whose keys are equal run as one forward."""
        return (self.name, config)

    def run_cached(
        self,
        model: SkipDiT,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
        config: ConfigT,
        states: Sequence[StateT],
    ) -> torch.Tensor:
        """One forward for the cached rows of ``states`` (in order, concatenated in x/t/y)."""
        return self.forward_cached(model, CachedBatch(x, t, y, states), config)

    def forward_cached(self, model: SkipDiT, batch: CachedBatch, config: ConfigT) -> torch.Tensor:
        """The policy's cached forward of one group (``run_cached`` bundles its arguments)."""
        raise NotImplementedError(f"cache policy {self.name!r} has no cached mode")

    def realized_mode(self, state: StateT, decided: Mode) -> Mode:
        """The mode a step really ran in (dynamic policies may compute a 'cached' step fully)."""
        return decided

    def state_bytes(self, state: StateT) -> int:
        """Memory the request's cache holds now."""
        return 0


@dataclass(frozen=True)
class CachedBatch:
    """The rows of one cached group: each request's rows consecutive, in the order of states."""

    x: torch.Tensor  # (B, C, H, W); video (B, C, F, H, W)
    t: torch.Tensor  # (B,)
    y: Condition  # (B,) labels, or a text model's text
    states: Sequence[Any]  # one per request

    def row_slices(self, rows: Iterable[int]) -> list[slice]:
        """Each request's rows of the batch, given each one's row count (states' order)."""
        ends = list(accumulate(rows))
        return [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def relative_changes(
    now: torch.Tensor, stored: Sequence[torch.Tensor], slices: Sequence[slice]
) -> list[float]:
    """Each request's mean |now - stored| / mean |stored| over its own rows: ``now`` (B, ...)
    holds the group's rows, each request's consecutive at its slice, ``stored`` each request's
    rows from before. One vectorised reduction and one host sync for the whole group, whatever
    its size; a request's figure depends on its own rows only."""
    before = torch.cat(list(stored))  # (B, ...): the slices tile the batch in order
    counts = torch.tensor([s.stop - s.start for s in slices], device=now.device)
    owner = torch.repeat_interleave(torch.arange(len(slices), device=now.device), counts)
    moved = (now - before).abs().flatten(1).float().sum(1)  # (B,) per row
    size = before.abs().flatten(1).float().sum(1)
    totals = torch.zeros(2, len(slices), device=now.device)
    totals[0].index_add_(0, owner, moved)
    totals[1].index_add_(0, owner, size)
    return (totals[0] / totals[1].clamp_min(1e-12)).tolist()


def gather_index(slices: Sequence[slice], device: torch.device) -> torch.Tensor:
    """The batch rows of the given requests' slices, in order: (rows,) indices to gather the
    rows that compute into one forward and to scatter its output back."""
    return torch.cat([torch.arange(s.start, s.stop) for s in slices]).to(device)


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the given tensors (None entries hold nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class RequestCache:
    """One request's cache: the policy, its validated config and the request's own state."""

    policy: CachePolicy
    config: Any
    state: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = self.policy.new_state()

    def decide(self, step: int, t: float) -> Mode:
        return self.policy.decide(step, t, self.config, self.state)

    def reset(self) -> None:
        self.state.reset()

    def capture_blocks(self, model: DiTConfig) -> tuple[Hashable, ...]:
        """Block indices whose entering hidden state this request's full steps hand on."""
        return self.policy.capture_blocks(self.config, model)
