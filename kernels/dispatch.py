"""Which implementation runs a kernel op: ``auto | triton | torch``.

- ``torch``: the op's plain torch reference, everywhere.
- ``triton``: the Triton kernel. On CUDA tensors when triton imports; on a CPU only under
  ``TRITON_INTERPRET=1`` (the interpreter: tests at small sizes). Anything else raises
  ``KernelUnavailable``: an explicitly asked backend never falls back silently.
- ``auto``: Triton on CUDA when it can run, torch elsewhere (never the interpreter).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal

import torch
from torch.library import CustomOpDef

Backend = Literal["auto", "triton", "torch"]
Resolved = Literal["triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


class KernelUnavailable(RuntimeError):
    """The kernel backend asked for cannot run here; the message says why."""


class Kernels:
    """A network's kernel choice: one object per network, held by reference by every module
    that launches a kernel op, so choosing a backend (``SkipDiT.use_kernels``) is one write."""

    def __init__(self, backend: Resolved = "torch") -> None:
        self.backend: Resolved = backend

    @property
    def triton(self) -> bool:
        """Whether the Triton kernels run (else the plain torch references)."""
        return self.backend == "triton"

    def __repr__(self) -> str:
        return f"Kernels({self.backend!r})"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def quick_tuning() -> bool:
    """``SKIPDIT_KERNEL_TUNING=quick`` (tests set it): the kernels autotune over one config, so
    each new specialization compiles once instead of once per config (minutes on a GPU test
    run that makes 15-20 of them)."""
    return os.environ.get("SKIPDIT_KERNEL_TUNING") == "quick"


def dtype_family(dtype: torch.dtype) -> str:
    """The autotune config family of an input dtype: ``fp32`` (IEEE dots on FMA units, tiles
    half the size before registers spill) or ``16-bit`` (tensor-core dots)."""
    return "fp32" if dtype == torch.float32 else "16-bit"


def autotune_by_dtype(
    triton: ModuleType, families: Mapping[str, Sequence[Any]], tensor_arg: str
) -> dict[str, Any]:
    """``triton.autotune`` arguments that try, for each launch, only the configs of its input
    dtype's family (``dtype_family`` of the tensor argument ``tensor_arg``); under quick tuning
    the first of each family alone."""
    chosen = {f: list(c[:1] if quick_tuning() else c) for f, c in families.items()}

    def prune(configs: list[Any], named_args: dict[str, Any], **_: Any) -> list[Any]:
        family = chosen[dtype_family(named_args[tensor_arg].dtype)]
        return [c for c in configs if any(c is f for f in family)]

    every = [c for configs in chosen.values() for c in configs]
    return {"configs": every, "prune_configs_by": {"early_config_prune": prune}}


def triton_missing_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return 'triton is not installed (pip install -e ".[gpu]")'
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on a CPU), got {device}"


def resolve(requested: str, device: torch.device | str) -> Resolved:
    """The backend that runs for ``requested`` on ``device``; raises KernelUnavailable."""
    device = torch.device(device)
    if requested not in BACKENDS:
        raise KernelUnavailable(f"unknown kernel backend {requested!r}; known: {list(BACKENDS)}")
    if requested == "torch":
        return "torch"
    reason = triton_missing_reason(device)
    if requested == "auto":
        return "triton" if device.type == "cuda" and reason is None else "torch"
    if reason is not None:
        raise KernelUnavailable(f"kernel backend 'triton' cannot run: {reason}")
    return "triton"


def kernel_op(name: str) -> Callable[[Callable[..., torch.Tensor]], CustomOpDef]:
    """Register a kernel's launcher as the op ``skipdit::<name>`` (register its fake, the output's
    shape, on the result), so ``torch.compile`` keeps one call of it in a full graph instead of
    stopping at the Triton launch, which Dynamo cannot trace.

    An opaque ``custom_op``, not a ``triton_op`` that Inductor would see into: a ``triton_op`` is
    traced with fake tensors, which Triton's CPU interpreter cannot take (so CI could not run
    it), and the launchers compute concrete values from shapes (the LSC tuning key next_pow2(M))
    that a dynamic batch dimension would leave symbolic. Inside the op the launch is eager,
    exactly as without compile; the kernel is one fused op either way."""
    return torch.library.custom_op(f"skipdit::{name}", mutates_args=())


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Where a kernel launches: a CUDA tensor's own device made current (Triton launches on the
    current device, so in a process with several GPUs a tensor on cuda:1 would otherwise be
    read by a kernel running on cuda:0); nothing to do on a CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def import_triton() -> ModuleType:
    """triton, imported for a launch, checked to run as ``interpreting()`` says. Triton reads
    TRITON_INTERPRET when it is first imported (diffusers imports it through torch._dynamo), so
    setting it later has no effect: that raises KernelUnavailable instead of failing obscurely."""
    import triton
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    if interpreting() and not isinstance(triton.language.zeros, InterpretedFunction):
        raise KernelUnavailable(
            "TRITON_INTERPRET=1 was set after triton was imported (torch._dynamo, which diffusers "
            "imports, imports it): set it before the first import of triton"
        )
    return triton
