"""The fast path checks itself at worker start (``Pipeline.use_fast_path``).

Each component that is on after warm-up, the Triton kernels (LSC fusion, attention) and the
captured steps (CUDA graphs or ``torch.compile`` per bucket), is compared with the eager torch
path on a seeded batch of every bucket: the full forward and, for a network with long skips,
Skip-Cache's cached forward. A component that raises, or whose largest difference relative to
the eager output's largest magnitude exceeds ``TOLERANCE`` for the network's dtype, fails. The
pipeline turns a failed component off for this worker, with one log line naming it and why, and
serves on the eager path (or fails the boot where the deployment asks for that).

The seeded batches are random inputs of the right shapes (a text model's text a random encoder
output): the check is of the arithmetic, which does not depend on the weights being trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from model.networks.conditions import Condition
from model.networks.skip_dit import SkipDiT
from model.networks.text_dit import TextDiTConfig, TextSkipDiT
from model.sampling.graphs import BucketedForward

# The largest max |fast - eager| / max |eager| a component may show: a few times what the
# dtype's rounding gives a reordered sum (fp32 kernels dot in IEEE fp32).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TEXT_TOKENS = 4  # tokens of a text model's seeded text


@dataclass(frozen=True)
class Verdict:
    """One component's check: passed, the largest relative difference seen (None where it
    raised), and why it failed ("" when it passed)."""

    component: str  # "kernels" or "graphs"
    passed: bool
    error: float | None
    reason: str = ""

    def describe(self) -> str:
        if self.passed:
            return f"passed (largest relative difference {self.error:.2g})"
        return f"off: {self.reason}"


Inputs = tuple[torch.Tensor, torch.Tensor, Condition, torch.Tensor]  # x, t, y, deep


def seeded_inputs(model: SkipDiT, rows: int, seed: int = 0) -> Inputs:
    """(x, t, y, deep) for ``rows`` rows on the network's device and dtype: noise, timesteps in
    [0, 1000), class labels (the null class included) or a random text, a random deep
    feature for cached forwards."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, *cfg.sample_shape), generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    deep = torch.randn((rows, *cfg.hidden_shape), generator=g)
    y: Condition
    if isinstance(cfg, TextDiTConfig):
        text = torch.randn(rows, TEXT_TOKENS, cfg.text_width, generator=g)
        mask = torch.ones(rows, TEXT_TOKENS, dtype=torch.long)
        with torch.inference_mode():
            y = cast(TextSkipDiT, model).encode_text(
                text.to(param.device, param.dtype), mask.to(param.device)
            )
    else:
        y = torch.randint(0, cfg.num_classes + 1, (rows,), generator=g).to(param.device)
    x, deep = (v.to(param.device, param.dtype) for v in (x, deep))
    return x, t.to(param.device), y, deep


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in fp32 (inf where got holds a NaN or inf)."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


Forward = Callable[[Inputs], list[torch.Tensor]]


def compare(
    component: str,
    model: SkipDiT,
    buckets: Sequence[int],
    eager: Forward,
    fast: Forward,
) -> Verdict:
    """``fast`` against ``eager`` on the seeded batch of every bucket (each returns the outputs
    to compare, in the same order)."""
    tolerance = TOLERANCE[next(model.parameters()).dtype]
    worst = 0.0
    for bucket in buckets:
        inputs = seeded_inputs(model, bucket, seed=bucket)
        try:
            with torch.inference_mode():
                want, got = eager(inputs), fast(inputs)
        except Exception as e:
            return Verdict(component, False, None, f"raised {type(e).__name__}: {e}"[:300])
        for g, w in zip(got, want, strict=True):
            worst = max(worst, relative_difference(g, w))
        if worst > tolerance:
            return Verdict(
                component,
                False,
                worst,
                f"differs from eager torch by {worst:.3g} at {bucket} rows "
                f"(tolerance {tolerance:g} for {next(model.parameters()).dtype})",
            )
    return Verdict(component, True, worst)


def forwards(model: SkipDiT, depth: int) -> Forward:
    """The network's full forward and, with long skips, its cached forward at ``depth``."""

    def run(inputs: Inputs) -> list[torch.Tensor]:
        x, t, y, deep = inputs
        outs = [model(x, t, y)]
        if model.config.long_skip:
            outs.append(model.forward_cached(x, t, y, deep, depth))
        return outs

    return run


def check_kernels(networks: Sequence[SkipDiT], buckets: Sequence[int], depth: int) -> Verdict:
    """Each network on the Triton backend against itself on the torch backend; leaves every
    network on Triton (the caller turns a failed check off)."""
    verdicts = []
    for network in networks:
        run = forwards(network, depth)

        def on_torch(inputs: Inputs, network: SkipDiT = network, run: Forward = run) -> list:
            network.use_kernels("torch")
            try:
                return run(inputs)
            finally:
                network.use_kernels("triton")

        verdicts.append(compare("kernels", network, buckets, on_torch, run))
    failed = [v for v in verdicts if not v.passed]
    if failed:
        return failed[0]
    return Verdict("kernels", True, max((v.error or 0.0) for v in verdicts))


def check_graphs(runner: BucketedForward, depth: int) -> Verdict:
    """The prepared (captured or compiled) forwards of every bucket against the eager network
    they were prepared from, on the same kernel backend."""
    model = runner.model
    cached = model.config.long_skip and depth in runner.depths

    def eager(inputs: Inputs) -> list[torch.Tensor]:
        x, t, y, deep = inputs
        return [model(x, t, y), *([model.forward_cached(x, t, y, deep, depth)] if cached else [])]

    def fast(inputs: Inputs) -> list[torch.Tensor]:
        x, t, y, deep = inputs
        assert isinstance(y, torch.Tensor)  # captured steps serve class models only
        out = [runner.full(x, t, y)[0]]
        return out + ([runner.cached(x, t, y, deep, depth)] if cached else [])

    return compare("graphs", model, runner.buckets, eager, fast)
