"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no GPU
(``TRITON_INTERPRET=1``, set by tests/conftest.py before anything imports triton).

Interpreter facts (triton 3.9): bf16 inputs to ``tl.dot`` give wrong results there, so CPU tests
use fp32/fp16; one autotune config only.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
