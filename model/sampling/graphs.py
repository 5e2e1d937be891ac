"""Captured denoising steps: the full and cached forwards per padded batch bucket, replayed as
CUDA graphs or compiled with ``torch.compile``.

On a GPU the eager step is bound by kernel launches, not FLOPs (DESIGN.md, Kernels: ~640
launches per full XL/2 step). A replayed CUDA graph issues the whole forward at once.

Prepared by ``warmup()``, per bucket ``b`` (rows a forward runs: 1, 2, 4, ..., 64):
- a *full* forward that also captures the deep feature of every prepared Skip-Cache depth K
  (the hidden state entering block D-K, ``model.cache.skip_cache``);
- a *cached* forward per prepared depth K (``SkipDiT.forward_cached``).

Modes: ``cuda_graphs`` captures each as a CUDA graph over static input buffers, all graphs in one
memory pool; ``compile`` compiles each kind once with ``torch.compile`` (one full graph, the
batch dimension dynamic: every bucket of 2 rows or more runs one graph, bucket 1 its own, as
Dynamo specialises size 1; a request that would recompile raises; the Triton kernels are ops
in it, ``kernels.dispatch.kernel_op``); ``off`` runs the same padded batches eagerly (the
reference for the padding and the baseline to measure against).

A batch of n rows runs in the smallest bucket b >= n; rows n..b-1 are padding, copies of row 0: a
valid input, so padding brings no NaN/inf the real rows do not have. No op of the network mixes
rows (per-sample attention, per-token norms), so padding never changes real rows. A batch above
the largest bucket is split into chunks of the largest bucket, the last one padded.

Every tensor returned is the caller's own: graph outputs are copied out of the static buffers
that the next replay (of any graph: they share one pool) overwrites.

A group holding a row with a LoRA adapter (``model.networks.lora``) runs eagerly: its terms
are added by Python hooks that a graph would not replay. Groups without one are served here.

Served: the plain forward with Skip-Cache's capture and Skip-Cache's cached forward (policies
``none`` and ``skip_cache``, see ``served``/``serves``). FORA, ToCa, Delta-DiT and fbcache
capture branch outputs or override branches and stay eager in the pipeline.

Capture needs no host synchronisation inside the forward: ``SkipDiT.forward`` and
``forward_cached`` have no ``.item()``, ``.cpu()`` or branch on tensor values (keep it so). The
network must not change after ``warmup()``: a graph keeps the parameters' addresses and the
kernel backend chosen by ``use_kernels``; weights updated in place are seen, replaced ones not.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, Literal, Protocol, cast

import torch

from model.cache import Mode, RequestCache
from model.networks.conditions import Condition
from model.networks.lora import Choice
from model.networks.skip_dit import SkipDiT

log = logging.getLogger(__name__)

RunMode = Literal["cuda_graphs", "compile", "off"]
RUN_MODES: tuple[str, ...] = ("cuda_graphs", "compile", "off")
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
GRAPH_WARMUP_RUNS = 3  # eager runs on a side stream before capture (autotune, cuBLAS workspace)


class Cached(Protocol):
    """What a group forward reads of each job of its group: the request's cache, and its rows
    of the group's batch."""

    cache: RequestCache
    adapter: Choice | None  # its LoRA adapter: such rows run eagerly (no hook is captured)

    @property
    def rows(self) -> int: ...


def group_capture(jobs: Sequence[Cached], model: SkipDiT) -> set[Hashable]:
    """The capture keys a FULL group's forward must hand back: every job's policy's."""
    return {k for job in jobs for k in job.cache.capture_blocks(model.config)}


class GroupForward(Protocol):
    """One step group's forward (``model.sampling.pipeline.forward_group`` is the eager one):
    x (rows, ...), t (rows,), y (rows,) hold the jobs' rows in order; returns the output and,
    for a FULL group, the hidden states the jobs' policies capture (else {})."""

    def __call__(
        self,
        model: SkipDiT,
        jobs: Sequence[Cached],
        full: bool,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
    ) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]: ...


# What a prepared forward computes: "full", or the cache depth K of a cached forward.
Kind = Literal["full"] | int
FULL: Kind = "full"
# Inputs and outputs of a prepared forward, batch first: (x, t, y) for a full forward, plus deep
# for a cached one; (out, *deep features in capture-key order) or (out,).
Tensors = tuple[torch.Tensor, ...]
GraphPool = Any  # torch.cuda.graph_pool_handle()'s (torch.cuda._POOL_HANDLE, private to torch)


class ModeUnavailable(RuntimeError):
    """The asked run mode cannot run here; the message names the mode and why."""


def resolve_mode(requested: str, device: torch.device) -> RunMode:
    """``auto``: CUDA graphs on a CUDA device, ``off`` elsewhere; an explicit mode as asked
    (``BucketedForward`` raises ModeUnavailable where it cannot run)."""
    if requested == "auto":
        return "cuda_graphs" if device.type == "cuda" else "off"
    if requested not in RUN_MODES:
        raise ValueError(f"graphs mode must be auto or one of {list(RUN_MODES)}, got {requested!r}")
    return cast(RunMode, requested)  # one of RUN_MODES, checked above


def stage(dest: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Write ``real`` (n rows) into ``dest`` (bucket rows); rows n.. become copies of row 0."""
    rows = real.shape[0]
    dest[:rows].copy_(real)
    dest[rows:].copy_(real[:1].expand_as(dest[rows:]))
    return dest


class _Padded:
    """One (kind, bucket) forward over freshly padded tensors: eager, or compiled ``fn``."""

    def __init__(self, fn: Callable[..., Tensors], bucket: int, compiled: bool):
        self.fn = fn
        self.bucket = bucket
        self.compiled = compiled

    def run(self, inputs: Tensors, rows: int) -> Tensors:
        padded = tuple(
            stage(real.new_empty((self.bucket, *real.shape[1:])), real) for real in inputs
        )
        if self.compiled and self.bucket > 1:  # one graph for every bucket but 1
            for tensor in padded:
                torch._dynamo.mark_dynamic(tensor, 0)
        outputs = self.fn(*padded)
        return tuple(out[:rows] for out in outputs)  # views of fresh tensors: the caller's

    def __call__(self, inputs: Tensors, rows: int) -> Tensors:
        if not self.compiled:
            return self.run(inputs, rows)
        with torch.compiler.set_stance("fail_on_recompile"):  # compiling belongs to warmup()
            return self.run(inputs, rows)


class _Replay:
    """One (kind, bucket) forward captured as a CUDA graph over static input buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: Tensors, outputs: Tensors):
        self.graph = graph
        self.inputs = inputs  # static, bucket rows; the graph reads them
        self.outputs = outputs  # static, bucket rows; every replay in the pool overwrites them

    def __call__(self, inputs: Tensors, rows: int) -> Tensors:
        for static, real in zip(self.inputs, inputs, strict=True):
            stage(static, real)
        self.graph.replay()
        return tuple(out[:rows].clone() for out in self.outputs)


def capture_graph(
    fn: Callable[..., Tensors], inputs: Tensors, pool: GraphPool
) -> tuple[torch.cuda.CUDAGraph, Tensors]:
    """Capture ``fn(*inputs)`` as a CUDA graph in ``pool``; returns it and its static outputs.

    Warm-up runs on a side stream first, as CUDA graph capture requires: lazy initialisation,
    cuBLAS workspaces and Triton autotuning (which synchronises) happen outside the capture."""
    side = torch.cuda.Stream(inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_RUNS):
            fn(*inputs)
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(*inputs)
    return graph, outputs


class BucketedForward:
    """The step's forwards (full, cached per depth K) per padded batch bucket, in one run mode.

    ``model``: the network, in eval mode, already on ``device`` in ``dtype`` (defaults: where
    its weights are); it is not moved. ``buckets``: batch sizes to prepare. ``depths``: the
    Skip-Cache depths K to prepare (each adds a cached forward per bucket and a captured deep
    feature to the full forward). Call ``warmup()`` once at worker start, then ``full`` and
    ``cached`` per step group.
    """

    def __init__(
        self,
        model: SkipDiT,
        mode: RunMode = "off",
        buckets: Collection[int] = DEFAULT_BUCKETS,
        depths: Collection[int] = (),
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        weight = next(model.parameters())
        self.model = model
        self.mode = mode
        self.buckets = tuple(sorted(set(buckets)))
        self.depths = tuple(sorted(set(depths)))
        self.dtype = dtype or weight.dtype
        self.device = weight.device  # cuda:i, where the weights are
        self._check(weight.dtype, torch.device(device) if device is not None else weight.device)
        # x, t, y, deep; t in fp32: flow matching's timesteps are fractional (sigma x 1000), and
        # the timestep embedder reads integer ones as floats anyway (exact below 2^24)
        self._dtypes = (self.dtype, torch.float32, torch.long, self.dtype)
        d = model.config.units  # blocks; Skip-Latte: block pairs
        self.capture_keys: tuple[int, ...] = tuple(d - k for k in self.depths)  # unit D-K per K
        self._forwards: dict[tuple[Kind, int], _Padded | _Replay] = {}
        self._pool: GraphPool | None = None  # the CUDA graphs' shared memory pool

    def _check(self, weight_dtype: torch.dtype, asked: torch.device) -> None:
        if self.mode not in RUN_MODES:
            raise ValueError(f"mode must be one of {list(RUN_MODES)}, got {self.mode!r}")
        if self.mode == "cuda_graphs" and not (
            self.device.type == "cuda" and torch.cuda.is_available()
        ):
            raise ModeUnavailable(
                f"mode 'cuda_graphs' needs a CUDA device; the model is on {self.device}, "
                f"torch.cuda.is_available() = {torch.cuda.is_available()}"
            )
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {self.buckets}")
        half = self.model.config.units // 2
        if any(not 1 <= k <= half for k in self.depths):
            raise ValueError(f"cache depths must be in [1, {half}], got {self.depths}")
        on = asked.type == self.device.type and asked.index in (None, self.device.index)
        if not on or weight_dtype != self.dtype:
            raise ValueError(
                f"the model's weights are {weight_dtype} on {self.device}, the runner was "
                f"asked for {self.dtype} on {asked}: move or cast the model first"
            )
        if self.model.training:
            raise ValueError("the model must be in eval mode (training draws label dropout)")

    # -- routing

    def serves(self, cache: RequestCache, mode: Mode) -> bool:
        """Whether a request's rows in ``mode`` run here: its policy declares the mode
        capturable (``CachePolicy.captured_modes``) and what the step needs is prepared (a full
        step's capture keys; a cached step's depth: a captured cached step is Skip-Cache's)."""
        if mode not in cache.policy.captured_modes(cache.config):
            return False
        if mode is Mode.FULL:
            return set(cache.capture_blocks(self.model.config)) <= set(self.capture_keys)
        return cache.config.depth in self.depths

    def group_forward(self, eager: GroupForward) -> RoutedForward:
        """A step group's forward through this runner where it serves every job of the group,
        through ``eager`` otherwise."""
        return RoutedForward(self, eager)

    # -- warm-up, at worker start

    @torch.inference_mode()
    def warmup(self) -> float:
        """Capture (or compile, or run once) every prepared forward; returns the seconds taken.

        Largest buckets first: smaller graphs then reuse the pool memory they freed. Calling
        again prepares everything anew (after the model's weights were replaced)."""
        start = time.perf_counter()
        self._forwards = {}
        self._pool = torch.cuda.graph_pool_handle() if self.mode == "cuda_graphs" else None
        with self._room_to_compile():
            for kind in (FULL, *self.depths):
                fn = self._eager(kind)
                if self.mode == "compile":  # the batch marked dynamic, nothing else
                    fn = torch.compile(fn, fullgraph=True)
                for bucket in reversed(self.buckets):
                    self._forwards[kind, bucket] = self._prepare(fn, kind, bucket)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log.info(
            "prepared %d forwards (mode %s, buckets %s, depths %s) in %.1fs",
            len(self._forwards), self.mode, self.buckets, self.depths, seconds,
        )  # fmt: skip
        return seconds

    def _eager(self, kind: Kind) -> Callable[..., Tensors]:
        """The plain forward of ``kind``: batch-first tensors in, a tuple of tensors out."""
        model, keys = self.model, self.capture_keys

        def full(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Tensors:
            if not keys:
                return (model(x, t, y),)
            out, captured = model.capturing(x, t, y, keys)  # (B, C_out, H, W), {k: (B, T, D)}
            return (out, *(captured[k] for k in keys))

        if not isinstance(kind, int):  # FULL
            return full
        depth = kind  # a cached forward's K

        def cached(
            x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, deep: torch.Tensor
        ) -> Tensors:
            return (model.forward_cached(x, t, y, deep, depth),)  # (B, C_out, H, W)

        return cached

    def _prepare(self, fn: Callable[..., Tensors], kind: Kind, bucket: int) -> _Padded | _Replay:
        inputs = self._dummy(kind, bucket)
        if self.mode == "cuda_graphs":
            assert self._pool is not None, "warmup() makes the pool before it captures"
            graph, outputs = capture_graph(fn, inputs, self._pool)
            return _Replay(graph, inputs, outputs)
        forward = _Padded(fn, bucket, compiled=self.mode == "compile")
        forward.run(inputs, bucket)  # compile now, never in a request
        return forward

    def _dummy(self, kind: Kind, bucket: int) -> Tensors:
        """Zero inputs of ``kind`` at ``bucket`` rows (timestep 0, label 0: valid values). In
        cuda_graphs mode these are the graph's static inputs."""
        return tuple(
            torch.zeros((bucket, *shape), dtype=dtype, device=self.device)
            for shape, dtype in zip(self._row_shapes(kind), self._dtypes, strict=False)
        )  # x (B, C, H, W), t (B,), y (B,)[, deep (B, T, D)]

    def _room_to_compile(self) -> contextlib.AbstractContextManager[object]:
        """Dynamo keeps 8 compiled versions per function by default (shared by every runner in
        the process); the cached forward needs two per depth (bucket 1, and the dynamic batch).
        Lookups past the limit work, so only warmup() raises it."""
        if self.mode != "compile":
            return contextlib.nullcontext()
        needed = 2 * max(1, len(self.depths))
        limit = torch._dynamo.config.recompile_limit + needed
        return torch._dynamo.config.patch(recompile_limit=limit)

    # -- steps

    @torch.inference_mode()
    def full(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        capture: Collection[Hashable] = (),
    ) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
        """``model.capturing(x, t, y, capture)`` for prepared capture keys (blocks D-K), always
        with the dict. x: (B, C, H, W); t, y: (B,). Returns (B, C_out, H, W), {k: (B, T, D)}."""
        wanted = set(capture)
        if not wanted <= set(self.capture_keys):
            raise ValueError(
                f"capture keys {sorted(wanted - set(self.capture_keys), key=repr)} are not "
                f"prepared (prepared: {self.capture_keys}, for depths {self.depths})"
            )
        out, *deep = self._run(FULL, (x, t, y))
        return out, {k: h for k, h in zip(self.capture_keys, deep, strict=True) if k in wanted}

    @torch.inference_mode()
    def cached(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        deep: torch.Tensor,
        depth: int,
    ) -> torch.Tensor:
        """``model.forward_cached(x, t, y, deep, depth)`` for a prepared depth. deep: (B, T, D).
        Returns (B, C_out, H, W)."""
        if depth not in self.depths:
            raise ValueError(f"cache depth {depth} is not prepared (prepared: {self.depths})")
        (out,) = self._run(depth, (x, t, y, deep))
        return out

    def _run(self, kind: Kind, inputs: Tensors) -> Tensors:
        if not self._forwards:
            raise RuntimeError("BucketedForward: call warmup() at worker start, before steps")
        inputs = self._checked(kind, inputs)
        rows, largest = inputs[0].shape[0], self.buckets[-1]
        if rows > largest:  # chunks of the largest bucket, the last one padded
            parts = [
                self._run(kind, tuple(i[s : s + largest] for i in inputs))
                for s in range(0, rows, largest)
            ]
            return tuple(torch.cat(chunks) for chunks in zip(*parts, strict=True))
        bucket = next(b for b in self.buckets if b >= rows)
        return self._forwards[kind, bucket](inputs, rows)

    def _checked(self, kind: Kind, inputs: Tensors) -> Tensors:
        """Inputs on the device in the prepared dtypes; raises on shapes a bucket cannot take
        (a static buffer's copy_ would broadcast them silently)."""
        rows = inputs[0].shape[0]
        expected = [(rows, *shape) for shape in self._row_shapes(kind)]
        got = [tuple(i.shape) for i in inputs]
        if rows < 1 or got != expected:
            raise ValueError(f"{kind} forward takes shapes {expected} (B >= 1), got {got}")
        return tuple(i.to(self.device, d) for i, d in zip(inputs, self._dtypes, strict=False))

    def _row_shapes(self, kind: Kind) -> list[tuple[int, ...]]:
        """Shape of one row of each input of ``kind``: x, t, y (and deep when cached)."""
        c = self.model.config
        shapes = [c.sample_shape, (), ()]  # x (C, H, W); video (C, F, H, W)
        return shapes if kind == FULL else [*shapes, c.hidden_shape]  # deep (T, D); (F, T, D)


class RoutedForward:
    """A ``GroupForward``: a group runs through ``runner`` where it serves every job of it (the
    runner's network, and ``BucketedForward.serves``), through ``eager`` otherwise."""

    def __init__(self, runner: BucketedForward, eager: GroupForward):
        self.runner = runner
        self.eager = eager

    def __call__(
        self,
        model: SkipDiT,
        jobs: Sequence[Cached],
        full: bool,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
    ) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
        runner, mode = self.runner, Mode.FULL if full else Mode.CACHED
        if (
            model is not runner.model
            or not isinstance(y, torch.Tensor)  # text: its length differs per batch
            or any(job.adapter is not None for job in jobs)  # adapters: Python hooks, eager
            or not all(runner.serves(job.cache, mode) for job in jobs)
        ):
            return self.eager(model, jobs, full, x, t, y)
        if full:
            return runner.full(x, t, y, group_capture(jobs, model))
        deep = torch.cat([job.cache.state.deep for job in jobs])  # (rows, T, D)
        return runner.cached(x, t, y, deep, jobs[0].cache.config.depth), {}
