"""Benchmark the flash-attention kernel against SDPA's backends at DiT-XL/2 shapes (CUDA only).

    python -m kernels.bench_attention [--batch 2 8 32 64] [--tokens 256 1024] [--dtype bf16 fp16]

For each shape it times the Triton kernel (both head tilings when Dh is not a power of two) and
the network's torch path (permute views -> SDPA -> (B, N, H*Dh)) under each SDPA backend that
takes the shape, and prints ms, TFLOP/s (4*B*H*N*N*Dh FLOPs) and the ratio to the best SDPA
backend. A benchmark script, not a test: it exits with a message where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--rep", type=int, default=100, help="timing window, ms (do_bench)")
    return parser.parse_args(argv)


def _time_ms(fn: Callable[[], object], rep: int) -> float:
    """Median ms of fn (triton.testing.do_bench: warmup, L2 flush, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _sdpa_ms(qkv: torch.Tensor, rep: int) -> dict[str, float | None]:
    """ms of the torch path under each SDPA backend; None where it does not take the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import reference

    results: dict[str, float | None] = {}
    for name in BACKENDS:
        backend = getattr(SDPBackend, name)

        def run(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return reference(qkv)

        try:
            run()
            torch.cuda.synchronize()
        except RuntimeError:
            results[name] = None
            continue
        results[name] = _time_ms(run, rep)
    return results


def _kernel_ms(qkv: torch.Tensor, rep: int) -> dict[str, float]:
    """ms of the Triton kernel per head tiling (one when they coincide)."""
    from kernels.attention import HeadTile, attention, head_tiles

    dh = qkv.shape[-1]
    tilings: list[HeadTile] = (
        ["pad", "split"] if head_tiles(dh, "pad") != head_tiles(dh, "split") else ["pad"]
    )
    return {
        f"triton-{t}": _time_ms(functools.partial(attention, qkv, head_tile=t), rep)
        for t in tilings
    }


def _check(qkv: torch.Tensor) -> float:
    """Max abs difference of the kernel vs the torch path (a sanity check on the timed shapes)."""
    from kernels.attention import attention, reference

    return (attention(qkv).float() - reference(qkv).float()).abs().max().item()


def bench_shape(b: int, n: int, h: int, dh: int, dtype: torch.dtype, rep: int) -> None:
    """Print one block of rows for (B, N, H, Dh, dtype)."""
    qkv = torch.randn(b, n, 3 * h * dh, device="cuda", dtype=dtype).view(b, n, 3, h, dh)
    flops = 4 * b * h * n * n * dh
    sdpa = _sdpa_ms(qkv, rep)
    timed = {k: v for k, v in sdpa.items() if v is not None}
    best = min(timed, key=timed.__getitem__)
    rows = {f"sdpa-{k.lower()}": v for k, v in sdpa.items()} | _kernel_ms(qkv, rep)
    print(f"\nB={b} N={n} H={h} Dh={dh} {dtype}  max|triton - torch| = {_check(qkv):.2e}")
    for name, ms in rows.items():
        if ms is None:
            print(f"  {name:<26} unsupported")
            continue
        mark = "  <- best sdpa" if name == f"sdpa-{best.lower()}" else ""
        ratio = timed[best] / ms
        print(f"  {name:<26} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s x{ratio:5.2f}{mark}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; this benchmark needs a GPU.", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("x = best SDPA ms / this row's ms (>1: faster than the best SDPA backend)")
    for dtype in args.dtype:
        for n in args.tokens:
            for b in args.batch:
                bench_shape(b, n, args.heads, args.head_dim, DTYPES[dtype], args.rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
