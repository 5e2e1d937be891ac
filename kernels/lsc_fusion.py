"""Long-skip fusion as one GEMM: ``y = Linear(LayerNorm(cat[x, s]))``.

The LayerNorm affine is folded into the linear once per model load (``fold``):
``W' = W * gamma``, ``u = W' 1``, ``c = W beta + b``, so that

    y = rstd * (h W'^T - mu * u) + c,        h = cat[x, s], mu / rstd over the 2d fused width.

The kernel walks K over x, then over s (two base pointers: the concat never exists), feeds each
(BLOCK_M, BLOCK_K) input tile to ``tl.dot`` and accumulates each row's sum and sum of squares
from the same tile (fp32), then applies the LayerNorm in the epilogue. Every N-tile program
walks the whole K range, so each recomputes its rows' statistics for free from its own loads.

One pass with a per-row shift won over both the plain one-pass form and a stats pre-pass.
The shift ``k_m`` is the mean of the row's first x tile (BLOCK_K elements, one extra tile load
before the K loop), rounded to the input dtype; the tiles go to the dot and to the statistics as
``h - k_m`` (fp32 subtract, then back to the input dtype for the dot: near exact, h and k_m
being close values of one dtype), and the epilogue uses ``mean(h - k_m) * u``. Measured on
inputs with mean 10, std 1 (d = d_out = 1152, M = 64, max |err| against an fp64 reference, seeds 0
and 1; torch = ``reference`` at that dtype, the yardstick the tests hold the kernel to within 2x):

    ==============================================  ================  ================
    form                                            fp32              fp16
    ==============================================  ================  ================
    torch ``reference``                             2.0e-06, 2.7e-06  1.1e-03, 1.1e-03
    one pass, uncentred                             3.7e-05, 5.1e-05  1.2e-03, 9.7e-04
    one pass, shifted statistics, uncentred dot     7.8e-06, 7.1e-06  1.2e-03, 9.7e-04
    one pass, shifted statistics and dot (this)     8.0e-07, 7.2e-07  1.2e-03, 9.7e-04
    pre-pass + normalise-on-load (torch emulation)  2.7e-06, 2.8e-06  1.8e-03, 1.9e-03
    ==============================================  ================  ================

That is fp32's form. For 16-bit inputs the dot takes the raw tiles and the epilogue subtracts
``(mean(h - k_m) + k_m) * u`` (the statistics stay shifted, in fp32): rounding ``h - k_m`` back
to 16 bits adds an error the data does not have, and with one large-activation channel in the
first tile (so a large ``k_m``; common in trained DiTs) that error reached about 2x torch's in a
bf16 emulation; the raw tiles also go to the dot straight from shared memory, not through
registers. 16-bit rounding of the products hides the dot's conditioning, which fp32 needs.

Uncentred, ``var = E[h^2] - mu^2`` cancels ~101 - 100 in fp32 and ``h W'^T`` carries ~10x the
signal, so fp32 misses the 2x bound by ~10x (fp16 hides it under its own rounding); shifting
only the statistics still leaves 2.6-3.9x torch. Shifting both makes them well conditioned
(|mean - k_m| is a fraction of a std), beating torch's own fp32 LayerNorm at this offset, for
one subtract per loaded element and no second launch or second read of x and s as a pre-pass
needs. The pre-pass also rounds twice at fp16 (normalised h and W' both to fp16, where torch
rounds only h), hence its 1.6-1.8x there. A shift by the row's first element alone reached
2.2x torch at fp32 on narrow rows (a sample 2-3 std off the mean costs ~3 bits of ``var``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FoldedLSC:
    """A long skip's LayerNorm affine folded into its linear, once per model load."""

    weight: torch.Tensor  # (d_out, 2d) W' = W * gamma, in the compute dtype
    u: torch.Tensor  # (d_out,) fp32, W' 1 (row sums of W')
    c: torch.Tensor  # (d_out,) fp32, W beta + b
    eps: float


# ----------------------------------------------------------------------------- torch reference


def reference(
    x: torch.Tensor, s: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear
) -> torch.Tensor:
    """cat + LayerNorm (fp32) + Linear, the network's torch path: (B, T, d) x 2 -> (B, T, d_out)."""
    h = torch.cat([x, s], dim=-1).float()
    h = F.layer_norm(h, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return linear(h.to(x.dtype))


def fold(norm: nn.LayerNorm, linear: nn.Linear) -> FoldedLSC:
    """Fold ``norm``'s affine into ``linear`` (pure torch, any device): W' in the linear's dtype,
    u (the row sums of that rounded W', so the mean term cancels exactly) and c in fp32."""
    w = linear.weight.detach()  # (d_out, 2d)
    if tuple(norm.normalized_shape) != (w.shape[1],):
        raise ValueError(
            f"LayerNorm over {tuple(norm.normalized_shape)} does not match the linear's input "
            f"width {w.shape[1]} (weight {tuple(w.shape)})"
        )
    with torch.no_grad():
        w32 = w.float()
        gamma = _param_or(norm.weight, 1.0, w.shape[1], w.device)  # (2d,)
        beta = _param_or(norm.bias, 0.0, w.shape[1], w.device)  # (2d,)
        bias = _param_or(linear.bias, 0.0, w.shape[0], w.device)  # (d_out,)
        weight = (w32 * gamma).to(w.dtype).contiguous()  # (d_out, 2d)
        u = weight.float().sum(dim=1)  # (d_out,)
        c = w32 @ beta + bias  # (d_out,)
    return FoldedLSC(weight=weight, u=u.contiguous(), c=c.contiguous(), eps=float(norm.eps))


def _param_or(p: torch.Tensor | None, value: float, n: int, device: torch.device) -> torch.Tensor:
    if p is None:
        return torch.full((n,), value, dtype=torch.float32, device=device)
    return p.detach().float()


def folded_reference(
    x: torch.Tensor, s: torch.Tensor, folded: FoldedLSC, block_k: int = 64
) -> torch.Tensor:
    """The kernel's algebra in fp32 torch (shifted one-pass statistics, folded epilogue):
    (..., d) x 2 -> (..., d_out) in x's dtype. Documents and tests ``fold`` without triton."""
    h = torch.cat([x, s], dim=-1).float()  # (..., 2d)
    shift = x[..., :block_k].float().mean(dim=-1, keepdim=True).to(x.dtype)  # (..., 1)
    h = h - shift.float()  # shifted by the mean of each row's first tile, as the kernel
    mean = h.mean(dim=-1, keepdim=True)  # (..., 1), of the shifted row
    var = ((h * h).mean(dim=-1, keepdim=True) - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(var + folded.eps)
    acc = h @ folded.weight.float().T  # (..., d_out)
    return (rstd * (acc - mean * folded.u) + folded.c).to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernel


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries on CUDA, per input
# dtype family (``dispatch.autotune_by_dtype``; quick tuning takes each family's first). Kept:
# the configs that compile for sm_90 without spilling (``python -m loadtest.compile_sm90``,
# docs/bench/gpu/compile_sm90.md): fp32's IEEE dots need BLOCK_K 32 (at 64 every tile spilled,
# up to 14 KB of stack); two 16-bit tiles that spilled are out.
CUDA_CONFIGS = {
    "fp32": (
        (64, 64, 32, 8, 3),
        (64, 128, 32, 8, 3),
        (128, 64, 32, 8, 3),
        (32, 64, 32, 4, 3),
        (64, 64, 32, 4, 3),
    ),
    "16-bit": (
        (64, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 128, 4, 3),
    ),
}


def _tuning(triton: Any) -> dict[str, Any]:
    """``triton.autotune``'s configs: one under the interpreter (several fail without a GPU),
    ``CUDA_CONFIGS`` by dtype on CUDA."""
    if dispatch.interpreting():
        return {"configs": [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128,
                                           "GROUP_M": 8})]}  # fmt: skip
    families = {
        family: [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=w,
                num_stages=st,
            )
            for bm, bn, bk, w, st in shapes
        ]
        for family, shapes in CUDA_CONFIGS.items()
    }
    return dispatch.autotune_by_dtype(triton, families, "x_ptr")


# Plain functions here, jit-compiled by _kernel() on first launch (as in kernels.attention): the
# interpreter runs kernels against this module's globals, so the helpers and `tl` are bound here.
tl: Any = None  # triton.language, bound by _kernel()


def _row_offsets(offs_m, INNER, stride_o, stride_i):
    # row m of a (outer, INNER, d) view sits at (m // INNER) * stride_o + (m % INNER) * stride_i
    m = offs_m.to(tl.int64)
    return (m // INNER) * stride_o + (m % INNER) * stride_i


def _row_shift(x_ptr, row_x, mask_m, D, BLOCK_K: tl.constexpr):
    # the mean of each row's first x tile, rounded to x's dtype (so h - shift is near exact)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < D
    a = tl.load(
        x_ptr + row_x[:, None] + offs_k[None, :],
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_K)
    mean = tl.sum(a.to(tl.float32), axis=1) / tl.sum(mask_k.to(tl.float32), axis=0)
    return mean.to(x_ptr.dtype.element_ty).to(tl.float32)


def _walk_k(acc, sum1, sum2, a_ptr, row_a, mask_m, shift, w_ptr, offs_n, mask_n,
            stride_wn, stride_wk, D,
            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
            SHIFT_DOT: tl.constexpr):  # fmt: skip
    # acc (BLOCK_M, BLOCK_N) += (a - shift) @ w[:, k]^T over k < D (SHIFT_DOT; else a @ w[:, k]^T,
    # the shift applied in the epilogue); sum1/sum2 (BLOCK_M,) of a - shift
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < D
        a = tl.load(
            a_ptr + row_a[:, None] + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        a32 = tl.where(mask_k[None, :], a.to(tl.float32) - shift[:, None], 0.0)
        sum1 += tl.sum(a32, axis=1)
        sum2 += tl.sum(a32 * a32, axis=1)
        if SHIFT_DOT:
            acc = tl.dot(a32.to(a.dtype), w, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc, sum1, sum2


def _lsc_fusion_kernel(x_ptr, s_ptr, w_ptr, u_ptr, c_ptr, y_ptr, M, N, D,
                      INNER_X, stride_xo, stride_xi, INNER_S, stride_so, stride_si,
                      stride_wn, stride_wk, stride_ym, eps, M_KEY,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      SHIFT_DOT: tl.constexpr):  # fmt: skip
    # x, s: M rows of D (last stride 1); w: (N, 2D); u, c: (N,) fp32; y: (M, N); M_KEY: the
    # autotune key's next_pow2(M), unused here
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n  # GROUP_M row tiles sweep N together (weight/input reuse in L2)
    first_m = (pid // group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row_x = _row_offsets(offs_m, INNER_X, stride_xo, stride_xi)  # (BLOCK_M,) int64
    row_s = _row_offsets(offs_m, INNER_S, stride_so, stride_si)
    shift = _row_shift(x_ptr, row_x, mask_m, D, BLOCK_K)  # (BLOCK_M,) fp32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, sum1, sum2 = _walk_k(acc, sum1, sum2, x_ptr, row_x, mask_m, shift, w_ptr,
                              offs_n, mask_n, stride_wn, stride_wk, D,
                              BLOCK_K, DOT_PRECISION, SHIFT_DOT)  # fmt: skip
    acc, sum1, sum2 = _walk_k(acc, sum1, sum2, s_ptr, row_s, mask_m, shift,
                              w_ptr + D * stride_wk, offs_n, mask_n, stride_wn, stride_wk,
                              D, BLOCK_K, DOT_PRECISION, SHIFT_DOT)  # fmt: skip
    # epilogue: LayerNorm over the 2D fused width, of the shifted rows
    mean = sum1 / (2 * D)  # (BLOCK_M,) mean - shift
    var = tl.maximum(sum2 / (2 * D) - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    u = tl.load(u_ptr + offs_n, mask=mask_n, other=0.0)  # (BLOCK_N,)
    c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)
    # acc holds (h - shift) W'^T, or h W'^T = (h - shift) W'^T + shift u without SHIFT_DOT
    centre = mean if SHIFT_DOT else mean + shift
    y = rstd[:, None] * (acc - centre[:, None] * u[None, :]) + c[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _kernel() -> Any:
    """Import triton and jit-wrap the functions above on first launch (triton is an optional
    extra; TRITON_INTERPRET is read now); returns the autotuned kernel. ``tl`` and the helpers are
    rebound as module globals: Triton's interpreter runs kernel source against them."""
    global tl, _row_offsets, _row_shift, _walk_k
    triton = dispatch.import_triton()
    tl = triton.language
    _row_offsets = triton.jit(_row_offsets)
    _row_shift = triton.jit(_row_shift)
    _walk_k = triton.jit(_walk_k)
    # M_KEY = next_pow2(M), not M: a new row count (an eager fallback's) must not benchmark
    # mid-request, nor a capture meet a key it has not seen
    return triton.autotune(key=["M_KEY", "N", "D"], **_tuning(triton))(
        triton.jit(_lsc_fusion_kernel)
    )


# ----------------------------------------------------------------------------- launcher


def _check(x: torch.Tensor, s: torch.Tensor, folded: FoldedLSC) -> None:
    """Raise ValueError (actual values in the message) unless the inputs fit the kernel."""
    w, u, c = folded.weight, folded.u, folded.c
    if x.shape != s.shape or x.ndim < 1:
        raise ValueError(f"x and s must have the same shape (..., d), got {x.shape} and {s.shape}")
    d = x.shape[-1]
    if w.ndim != 2 or w.shape[1] != 2 * d:
        raise ValueError(f"folded weight must be (d_out, 2d) = (*, {2 * d}), got {tuple(w.shape)}")
    if u.shape != (w.shape[0],) or c.shape != (w.shape[0],):
        raise ValueError(
            f"u and c must be ({w.shape[0]},), got {tuple(u.shape)} and {tuple(c.shape)}"
        )
    if x.dtype not in _DTYPES or not (x.dtype == s.dtype == w.dtype):
        raise ValueError(
            f"x, s and the folded weight must share one of {_DTYPES}, "
            f"got {x.dtype}, {s.dtype} and {w.dtype}"
        )
    if u.dtype != torch.float32 or c.dtype != torch.float32:
        raise ValueError(f"u and c must be float32, got {u.dtype} and {c.dtype}")
    devices = {t.device for t in (x, s, w, u, c)}
    if len(devices) != 1:
        raise ValueError(
            f"x, s, weight, u, c must be on one device, got {sorted(map(str, devices))}"
        )
    if u.stride(0) != 1 or c.stride(0) != 1:
        raise ValueError(f"u and c must be contiguous, got strides {u.stride()} and {c.stride()}")


def _row_layout(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(INNER, stride_o, stride_i): row m of ``t`` flattened to (M, d) starts at element
    (m // INNER) * stride_o + (m % INNER) * stride_i. Any view whose last stride is 1 and whose
    leading dims collapse to one or two strides; raises ValueError with the strides otherwise."""
    d = t.shape[-1]
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have last-dim stride 1, got shape {tuple(t.shape)} strides {t.stride()}"
        )
    with contextlib.suppress(RuntimeError):
        v = t.view(-1, d)  # (M, d)
        return v.shape[0], 0, v.stride(0)
    if t.ndim >= 3:
        with contextlib.suppress(RuntimeError):
            v = t.view(-1, t.shape[-2], d)  # (outer, T, d)
            return v.shape[1], v.stride(0), v.stride(1)
    raise ValueError(
        f"{name}'s leading dims must collapse to at most (outer, tokens) strides, got shape "
        f"{tuple(t.shape)} strides {t.stride()}; pass .contiguous()"
    )


def lsc_fusion(x: torch.Tensor, s: torch.Tensor, folded: FoldedLSC) -> torch.Tensor:
    """``Linear(LayerNorm(cat[x, s]))`` in one Triton GEMM: (..., d) x 2 -> (..., d_out) in x's
    dtype. x and s may be views (last stride 1). Raises ValueError for inputs that do not fit,
    KernelUnavailable where Triton cannot run (no triton; a CPU tensor without TRITON_INTERPRET=1,
    or in bf16)."""
    _check(x, s, folded)
    reason = dispatch.triton_missing_reason(x.device)
    if reason is None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        reason = "bf16 dots give wrong results in Triton's CPU interpreter (triton 3.9)"
    if reason is not None:
        raise dispatch.KernelUnavailable(f"lsc_fusion needs Triton: {reason}")
    _row_layout(x, "x")  # a layout the kernel cannot walk raises here, not inside the op
    _row_layout(s, "s")
    return _lsc_fusion_op(x, s, folded.weight, folded.u, folded.c, folded.eps)


@dispatch.kernel_op("lsc_fusion")
def _lsc_fusion_op(
    x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, u: torch.Tensor, c: torch.Tensor, eps: float
) -> torch.Tensor:
    d, n = x.shape[-1], w.shape[0]
    m = math.prod(x.shape[:-1])
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, d_out)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    inner_x, stride_xo, stride_xi = _row_layout(x, "x")
    inner_s, stride_so, stride_si = _row_layout(s, "s")

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    with dispatch.on_device(x.device):
        _kernel()[grid](
            x, s, w, u, c, y, m, n, d,
            inner_x, stride_xo, stride_xi, inner_s, stride_so, stride_si,
            w.stride(0), w.stride(1), y.stride(0), eps, 1 << (m - 1).bit_length(),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            SHIFT_DOT=x.dtype == torch.float32,
        )  # fmt: skip
    return y.view(*x.shape[:-1], n)


@_lsc_fusion_op.register_fake
def _(
    x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, u: torch.Tensor, c: torch.Tensor, eps: float
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
