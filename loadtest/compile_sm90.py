"""Compile both Triton kernels for Hopper (sm_90) on this machine, no GPU needed: every autotune
config (``CUDA_CONFIGS``, each dtype its family's) in fp32, bf16 and fp16, through Triton's own
compiler (``triton.compile`` with a stand-in ``GPUTarget``, down to a cubin with the ptxas
Triton ships), then registers, stack (spills) and shared memory per config from
``cuobjdump -res-usage``.

    python -m loadtest.compile_sm90 [--kernels lsc attention] [--dtypes fp32 bf16 fp16]

Shapes are DiT-XL/2's (hidden 1152, 16 heads of 72, 256 tokens); integer arguments that are
multiples of 16 at those shapes are compiled as such (Triton specialises them the same way at
launch). Prints one table row per (kernel, dtype, config) and each compile's seconds: what a
cold worker spends per new specialization. A config that fails to compile prints its error.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

TRITON_TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
HIDDEN, HEADS, HEAD_DIM, TOKENS = 1152, 16, 72, 256


def _attrs(signature: dict[str, str], divisible: set[str]) -> dict[tuple[int, ...], list]:
    """Triton's launch-time specialisation: pointers and the named ints divisible by 16."""
    names = list(signature)
    return {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if signature[n].startswith("*") or n in divisible
    }


def lsc_source(triton: Any, dtype: str, config: tuple[int, ...]) -> tuple[Any, dict]:
    from kernels import lsc_fusion

    kernel = lsc_fusion._kernel().fn  # the jitted kernel inside the autotuner
    bm, bn, bk, warps, stages = config
    t = TRITON_TYPES[dtype]
    signature = {
        "x_ptr": f"*{t}", "s_ptr": f"*{t}", "w_ptr": f"*{t}", "u_ptr": "*fp32",
        "c_ptr": "*fp32", "y_ptr": f"*{t}", "M": "i32", "N": "i32", "D": "i32",
        "INNER_X": "i32", "stride_xo": "i32", "stride_xi": "i32", "INNER_S": "i32",
        "stride_so": "i32", "stride_si": "i32", "stride_wn": "i32", "stride_wk": "i32",
        "stride_ym": "i32", "eps": "fp32", "M_KEY": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "GROUP_M": "constexpr", "DOT_PRECISION": "constexpr", "SHIFT_DOT": "constexpr",
    }  # fmt: skip
    constexprs = {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "SHIFT_DOT": dtype == "fp32",
        "stride_wk": 1,
    }  # fmt: skip
    divisible = {"N", "D", "INNER_X", "stride_xo", "stride_xi", "INNER_S", "stride_so",
                 "stride_si", "stride_wn", "stride_ym", "M_KEY"}  # fmt: skip
    src = triton.compiler.ASTSource(
        fn=kernel, signature=signature, constexprs=constexprs, attrs=_attrs(signature, divisible)
    )
    return src, {"num_warps": warps, "num_stages": stages}


def attention_source(triton: Any, dtype: str, config: tuple[int, ...]) -> tuple[Any, dict]:
    from kernels import attention

    kernel = attention._kernel().fn
    bm, bn, warps, stages = config
    block_d, block_dt = attention.head_tiles(HEAD_DIM)
    t = TRITON_TYPES[dtype]
    signature = {
        "qkv_ptr": f"*{t}", "o_ptr": f"*{t}", "N_CTX": "i32", "qk_scale": "fp32",
        "stride_qb": "i32", "stride_qn": "i32", "stride_qs": "i32", "stride_ob": "i32",
        "stride_on": "i32", "H": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr",
        "BLOCK_DT": "constexpr", "HAS_TAIL": "constexpr", "PRECISION": "constexpr",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    }  # fmt: skip
    constexprs = {
        "H": HEADS, "HEAD_DIM": HEAD_DIM, "BLOCK_D": block_d, "BLOCK_DT": max(block_dt, 1),
        "HAS_TAIL": block_dt > 0, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "BLOCK_M": bm, "BLOCK_N": bn,
    }  # fmt: skip
    divisible = {"N_CTX", "stride_qb", "stride_qn", "stride_qs", "stride_ob", "stride_on"}
    src = triton.compiler.ASTSource(
        fn=kernel, signature=signature, constexprs=constexprs, attrs=_attrs(signature, divisible)
    )
    return src, {"num_warps": warps, "num_stages": stages}


def resources(cuobjdump: Path, cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", default=["lsc", "attention"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import attention, lsc_fusion

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", 90, 32)
    kernels = {
        "lsc": (lsc_source, lsc_fusion.CUDA_CONFIGS),
        "attention": (attention_source, attention.CUDA_CONFIGS),
    }
    print(f"triton {triton.__version__}, target sm_90 (compiled on the CPU, no GPU)\n")
    print("| kernel | dtype | config | registers | stack (spill) bytes | shared KiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.kernels:
        build, families = kernels[name]
        for dtype in args.dtypes:
            for config in families["fp32" if dtype == "fp32" else "16-bit"]:
                src, options = build(triton, dtype, config)
                began = time.perf_counter()
                try:
                    compiled = triton.compile(src, target=target, options=options)
                except Exception as e:  # report and go on
                    print(f"| {name} | {dtype} | {config} | failed: {str(e)[:80]} | | | |")
                    continue
                seconds = time.perf_counter() - began
                r = resources(cuobjdump, compiled.asm["cubin"])
                print(
                    f"| {name} | {dtype} | {config} | {r.get('REG')} | {r.get('STACK')} "
                    f"| {compiled.metadata.shared / 1024:.0f} | {seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
