"""Benchmark the long-skip fusion kernel against torch at DiT-XL/2 shapes (CUDA only).

    python -m kernels.bench_lsc_fusion [--batch 2 8 32 64] [--tokens 256 1024] [--dtype bf16 fp16]

For each shape (B, T, d) it times the Triton kernel (the fold is done once, outside the timing,
as at model load) and three torch rows: the network's path (cat -> fp32 LayerNorm -> Linear, i.e.
``lsc_fusion.reference``), cat -> LayerNorm in the input dtype -> Linear, and the bare GEMM on a
ready concat (the cuBLAS floor for the same FLOPs). It prints ms, TFLOP/s (2 * M * d_out * 2d
FLOPs, M = B * T) and the ratio to the network's path. A benchmark script, not a test: it exits
with a message where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--hidden", type=int, default=1152, help="d (DiT-XL/2: 1152)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--rep", type=int, default=100, help="timing window, ms (do_bench)")
    return parser.parse_args(argv)


def _time_ms(fn: Callable[[], object], rep: int) -> float:
    """Median ms of fn (triton.testing.do_bench: warmup, L2 flush, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _modules(d: int, dtype: torch.dtype) -> tuple[nn.LayerNorm, nn.Linear]:
    """A long skip's LayerNorm(2d) and Linear(2d -> d) on CUDA, with a non-trivial affine."""
    norm = nn.LayerNorm(2 * d, eps=1e-6)
    linear = nn.Linear(2 * d, d)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    return norm.to("cuda", dtype), linear.to("cuda", dtype)


def bench_shape(b: int, t: int, d: int, dtype: torch.dtype, rep: int) -> None:
    """Print one block of rows for (B, T, d, dtype)."""
    from kernels import lsc_fusion

    norm, linear = _modules(d, dtype)
    x = torch.randn(b, t, d, device="cuda", dtype=dtype)  # (B, T, d)
    s = torch.randn(b, t, d, device="cuda", dtype=dtype)
    h = torch.cat([x, s], dim=-1)  # (B, T, 2d), for the bare-GEMM row only
    folded = lsc_fusion.fold(norm, linear)
    rows = {
        "torch: cat+fp32 LN+linear": lambda: lsc_fusion.reference(x, s, norm, linear),
        "torch: cat+LN+linear": lambda: linear(norm(torch.cat([x, s], dim=-1))),
        "torch: linear (GEMM floor)": lambda: F.linear(h, folded.weight),
        "triton: fused": lambda: lsc_fusion.lsc_fusion(x, s, folded),
    }
    with torch.no_grad():
        err = (rows["triton: fused"]().float() - rows["torch: cat+fp32 LN+linear"]().float()).abs()
        times = {name: _time_ms(fn, rep) for name, fn in rows.items()}
    flops = 2 * b * t * linear.out_features * 2 * d
    base = times["torch: cat+fp32 LN+linear"]
    print(f"\nB={b} T={t} M={b * t} d={d} {dtype}  max|triton - torch| = {err.max().item():.2e}")
    for name, ms in times.items():
        print(f"  {name:<28} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s x{base / ms:5.2f}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench_lsc_fusion: no CUDA device; this benchmark needs a GPU.", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("x = network torch path ms / this row's ms (>1: faster than cat + fp32 LN + linear)")
    for dtype in args.dtype:
        for t in args.tokens:
            for b in args.batch:
                bench_shape(b, t, args.hidden, DTYPES[dtype], args.rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
