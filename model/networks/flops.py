"""FLOPs counted op by op with torch's ``FlopCounterMode`` (2 FLOPs per multiply-add).

torch 2.13 counts no FLOPs for the CPU kernel of ``scaled_dot_product_attention``
(``_scaled_dot_product_flash_attention_for_cpu``); ``counter`` counts it with torch's own SDPA
formula, as the CUDA kernels are counted, so attention is in every count on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(
    query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any
) -> int:
    """FlopCounterMode hands shapes: q (B, H, N, Dh), k and v (B, H, M, Dh)."""
    return sdpa_flop_count(query, key, value)


CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counter() -> FlopCounterMode:
    """A silent FlopCounterMode that counts CPU attention too; use it as a context manager."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM)


def count(run: Callable[[], Any]) -> float:
    """FLOPs of ``run()``."""
    with counter() as flops:
        run()
    return float(flops.get_total_flops())
