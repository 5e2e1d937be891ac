"""Flash-attention forward reading q, k, v straight from the qkv projection's layout.

``qkv`` is the fused projection's output viewed as (B, N, 3, H, Dh) (a view of a contiguous
(B, N, 3*H*Dh) tensor); the kernel reads q, k and v through its strides (no permute copies) and
writes (B, N, H*Dh), ready for the output projection. Non-causal, scale 1/sqrt(Dh), online
softmax in base 2, fp32 accumulation, output in the input dtype.

Head dims that are not a power of two (DiT-XL: 1152/16 = 72) take one of two head tilings, a
``head_tile`` argument (a constexpr choice in the kernel, so both can be benchmarked):

- ``"split"`` (default): a power-of-two head tile plus a masked tail tile of at least 16 columns
  (the smallest ``tl.dot`` K): 72 -> 64 + 16, 11% extra FLOPs, two dots per product.
- ``"pad"``: one tile of next_pow2(Dh) columns (72 -> 128), masked past Dh. Simplest; the
  masked columns cost 44% extra dot FLOPs at Dh=72.

The default is "split" for its FLOPs, not measured: re-measure on the GPU
(``python -m kernels.bench_attention``) and change it if "pad" wins.

A head starts ``off_h * HEAD_DIM`` elements into its token's q (or k, v) row: the launcher
requires the heads packed (stride Dh, as the projection's output view has), and the constexpr
offset lets the compiler prove 16-byte alignment where Dh is a multiple of 8, so tiles load
with vectorised, pipelined copies (with a runtime head stride of 72 it could not: scalar loads
and register pressure, seen compiling for sm_90).

Layers: torch reference, Triton kernel (built on first launch so that triton stays optional and
``TRITON_INTERPRET`` is read then), launcher that validates shape, strides and dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F

from kernels import dispatch

HeadTile = Literal["pad", "split"]
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA grid axis 1 limit; B*H runs on it
MIN_DOT = 16  # smallest tl.dot dimension
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- torch reference


def reference(qkv: torch.Tensor) -> torch.Tensor:
    """(B, N, 3, H, Dh) -> (B, N, H*Dh): SDPA on the permuted heads, as the network's torch path."""
    b, n, _, h, dh = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
    return out.transpose(1, 2).reshape(b, n, h * dh)


# ----------------------------------------------------------------------------- Triton kernel


# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries on CUDA, per input dtype family
# (``dispatch.autotune_by_dtype``; quick tuning takes each family's first). Kept: the configs
# that compile for sm_90 (Dh 72, split tiles) without spilling (``python -m
# loadtest.compile_sm90``, docs/bench/gpu/compile_sm90.md); in fp32 every 16-bit config spilled.
CUDA_CONFIGS = {
    "fp32": ((32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)),
    "16-bit": ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2)),
}


def _tuning(triton: Any) -> dict[str, Any]:
    """``triton.autotune``'s configs: one when interpreting (several fail without a GPU; big
    blocks keep the interpreter's per-op overhead down), ``CUDA_CONFIGS`` by dtype on CUDA."""
    if dispatch.interpreting():
        return {"configs": [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4,
                                          num_stages=1)]}  # fmt: skip
    families = {
        family: [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes
        ]
        for family, shapes in CUDA_CONFIGS.items()
    }
    return dispatch.autotune_by_dtype(triton, families, "qkv_ptr")


# Plain functions here, jit-compiled by _kernel() on first launch: triton is an optional extra,
# and triton.jit reads TRITON_INTERPRET when it wraps. The interpreter runs kernels against this
# module's globals (not closures), so the wrapped functions and `tl` are bound here.
tl: Any = None  # triton.language, bound by _kernel()


def _load_tile(ptr, offs_r, stride_r, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    """(R, D) tile at ptr + r*stride_r + d, zero outside rows < n_rows and d < HEAD_DIM."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_d[None, :], mask=mask, other=0.0)


def _store_tile(ptr, x, offs_r, stride_r, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    """Store the (R, D) tile x at ptr + r*stride_r + d where rows < n_rows and d < HEAD_DIM."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    ptrs = ptr + offs_r[:, None] * stride_r + offs_d[None, :]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


def _attn_fwd(
    qkv_ptr, o_ptr, N_CTX, qk_scale,
    stride_qb, stride_qn, stride_qs, stride_ob, stride_on,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(N, BLOCK_M), B*H): one query block of one (sample, head)
    start_m = tl.program_id(0) * BLOCK_M
    off_b = tl.program_id(1) // H
    off_h = tl.program_id(1) % H
    # int64 bases; the in-tile offsets below stay small (int32)
    base = off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * HEAD_DIM  # heads packed
    q_ptr = qkv_ptr + base + start_m.to(tl.int64) * stride_qn
    k_ptr = qkv_ptr + base + stride_qs
    v_ptr = qkv_ptr + base + 2 * stride_qs
    offs_m = tl.arange(0, BLOCK_M)  # query rows, relative to start_m
    offs_n = tl.arange(0, BLOCK_N)  # key rows, relative to the key block
    offs_d = tl.arange(0, BLOCK_D)  # head columns
    offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)  # tail columns (split tiling only)
    rows = N_CTX - start_m
    q = _load_tile(q_ptr, offs_m, stride_qn, rows, offs_d, HEAD_DIM)  # (BM, BD)
    if HAS_TAIL:
        qt = _load_tile(q_ptr, offs_m, stride_qn, rows, offs_t, HEAD_DIM)  # (BM, BT)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    for start_n in range(0, N_CTX, BLOCK_N):
        keys = N_CTX - start_n
        k = _load_tile(k_ptr, offs_n, stride_qn, keys, offs_d, HEAD_DIM)  # (BN, BD)
        v = _load_tile(v_ptr, offs_n, stride_qn, keys, offs_d, HEAD_DIM)  # (BN, BD)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN) fp32
        if HAS_TAIL:
            kt = _load_tile(k_ptr, offs_n, stride_qn, keys, offs_t, HEAD_DIM)  # (BN, BT)
            s += tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
        s = tl.where(offs_n[None, :] < keys, s * qk_scale, float("-inf"))  # ragged keys
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block has a valid key
        alpha = tl.math.exp2(m_i - m_new)  # (BM,)
        p = tl.math.exp2(s - m_new[:, None])  # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if HAS_TAIL:
            vt = _load_tile(v_ptr, offs_n, stride_qn, keys, offs_t, HEAD_DIM)  # (BN, BT)
            acc_t = acc_t * alpha[:, None]
            acc_t += tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
        k_ptr += BLOCK_N * stride_qn
        v_ptr += BLOCK_N * stride_qn
    # out[b, start_m + m, h*Dh + d] = acc / l
    o_ptr += off_b.to(tl.int64) * stride_ob + start_m.to(tl.int64) * stride_on + off_h * HEAD_DIM
    _store_tile(o_ptr, acc / l_i[:, None], offs_m, stride_on, rows, offs_d, HEAD_DIM)
    if HAS_TAIL:
        _store_tile(o_ptr, acc_t / l_i[:, None], offs_m, stride_on, rows, offs_t, HEAD_DIM)


@functools.cache
def _kernel() -> Any:
    """Import triton, jit-wrap the functions above (once) and return the autotuned kernel."""
    global tl, _load_tile, _store_tile
    triton = dispatch.import_triton()
    tl = triton.language
    _load_tile = triton.jit(_load_tile)
    _store_tile = triton.jit(_store_tile)
    # not the batch: a batch size the tuner has not seen (an eager fallback, a capture) must
    # never benchmark mid-request; the tiles' best size depends on the sequence and the head
    key = ["N_CTX", "H", "HEAD_DIM", "BLOCK_D", "BLOCK_DT"]
    return triton.autotune(key=key, **_tuning(triton))(triton.jit(_attn_fwd))


# ----------------------------------------------------------------------------- launcher


def head_tiles(head_dim: int, head_tile: HeadTile = "split") -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DT): head tile and tail tile widths; BLOCK_DT == 0 means no tail."""
    if head_tile not in ("pad", "split"):
        raise ValueError(f"head_tile must be 'pad' or 'split', got {head_tile!r}")
    if head_tile == "pad" or head_dim <= MIN_DOT:
        return max(MIN_DOT, _next_pow2(head_dim)), 0
    block_d = 1 << (head_dim.bit_length() - 1)  # largest power of two <= Dh
    tail = head_dim - block_d
    return block_d, (max(MIN_DOT, _next_pow2(tail)) if tail else 0)


def _next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), as triton.next_power_of_2 without importing it."""
    return 1 << (n - 1).bit_length()


def _validate(qkv: torch.Tensor) -> None:
    """Raise ValueError (with the actual values) unless qkv is a (B, N, 3, H, Dh) view we read."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, Dh), got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have unit stride on Dh, got strides {qkv.stride()}")
    if qkv.shape[3] > 1 and qkv.stride(3) != qkv.shape[-1]:
        raise ValueError(f"qkv heads must be packed (head stride Dh), got strides {qkv.stride()}")
    if qkv.dtype not in DTYPES:
        raise ValueError(f"qkv dtype must be one of {DTYPES}, got {qkv.dtype}")
    if not 1 <= qkv.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {qkv.shape[-1]}")
    if qkv.shape[0] * qkv.shape[3] > MAX_GRID_Y:
        raise ValueError(f"B*H must be <= {MAX_GRID_Y} (grid axis 1), got shape {tuple(qkv.shape)}")
    reason = dispatch.triton_missing_reason(qkv.device)
    if reason is None and qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
        reason = "bf16 dots give wrong results in Triton's CPU interpreter (triton 3.9)"
    if reason is not None:
        raise dispatch.KernelUnavailable(reason)


def attention(qkv: torch.Tensor, *, head_tile: HeadTile = "split") -> torch.Tensor:
    """(B, N, 3, H, Dh) -> (B, N, H*Dh) in qkv's dtype: softmax(q k^T / sqrt(Dh)) v per head.

    Raises ValueError for a shape, stride or dtype the kernel does not take, KernelUnavailable
    where Triton cannot run (no triton; a CPU tensor without TRITON_INTERPRET=1, or in bf16).
    Launched through the op ``skipdit::attention`` (``dispatch.kernel_op``), so torch.compile
    traces a graph through it."""
    _validate(qkv)
    head_tiles(qkv.shape[-1], head_tile)  # a bad head_tile raises here, not inside the op
    return _attention_op(qkv, head_tile)


@dispatch.kernel_op("attention")
def _attention_op(qkv: torch.Tensor, head_tile: str) -> torch.Tensor:
    b, n, _, h, dh = qkv.shape
    out = torch.empty(b, n, h * dh, device=qkv.device, dtype=qkv.dtype)  # (B, N, H*Dh)
    if out.numel() == 0:
        return out
    block_d, block_dt = head_tiles(dh, cast(HeadTile, head_tile))
    s_b, s_n, s_s, _, _ = qkv.stride()  # heads packed: the kernel offsets them by HEAD_DIM

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (n + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], b * h

    with dispatch.on_device(qkv.device):
        _kernel()[grid](
            qkv, out, n, LOG2E / math.sqrt(dh),
            s_b, s_n, s_s, out.stride(0), out.stride(1),
            H=h, HEAD_DIM=dh, BLOCK_D=block_d, BLOCK_DT=max(block_dt, 1), HAS_TAIL=block_dt > 0,
            PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        )  # fmt: skip
    return out


@_attention_op.register_fake
def _(qkv: torch.Tensor, head_tile: str) -> torch.Tensor:
    b, n, _, h, dh = qkv.shape
    return qkv.new_empty(b, n, h * dh)
