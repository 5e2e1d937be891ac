"""Flash-attention kernel vs an fp64 reference, within 2x plain torch's own error at each dtype.

Runs in Triton's CPU interpreter without a GPU (fp32 and fp16 there; bf16 only on CUDA, where
the interpreter's bf16 dots are wrong). Shapes stay small: B*H of 1-4 and N up to 256 (the file
takes ~5 s there).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from kernels import attention as attn
from kernels import dispatch
from model.networks.skip_dit import Attention

DTYPES = [torch.float32, torch.float16]
if torch.cuda.is_available():
    DTYPES.append(torch.bfloat16)

# (B, N, H, Dh, head_tile): Dh 72 (DiT-XL) both tilings, 64, 128, 16 (digits-tiny);
# N = 1, 7, 64, 100 and 256 (ragged against the 64-row blocks where not a multiple)
CASES = [
    (1, 1, 2, 72, "pad"),
    (2, 7, 2, 16, "pad"),
    (1, 64, 2, 16, "pad"),
    (1, 100, 1, 72, "pad"),
    (1, 100, 1, 72, "split"),
    (1, 256, 1, 72, "split"),
    (1, 256, 1, 64, "pad"),
    (2, 256, 2, 72, "pad"),
    (1, 256, 1, 128, "pad"),
    (1, 100, 1, 128, "pad"),
    (1, 7, 1, 128, "split"),
]


def _qkv(b: int, n: int, h: int, dh: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """fp64 (B, N, 3, H, Dh) view of a contiguous (B, N, 3*H*Dh) tensor."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(b, n, 3 * h * dh, generator=gen, dtype=torch.float64) * scale
    return flat.view(b, n, 3, h, dh)


def _errors(out: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    """(max abs, RMS) error of out against the fp64 reference."""
    diff = out.double().cpu() - ref64
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()


def _check_within_torch(qkv64: torch.Tensor, dtype: torch.dtype, device: str, **kw: str) -> None:
    """Kernel error vs fp64 <= 2x SDPA's error at the same dtype (max abs and RMS), or a few ulp
    of the output's scale where both are that small (fp32: twice a one-ulp error of torch's
    would fail a kernel two ulp off)."""
    ref64 = attn.reference(qkv64)
    x = qkv64.to(device=device, dtype=dtype)
    out = attn.attention(x, **kw)
    assert out.shape == ref64.shape and out.dtype == dtype and out.is_contiguous()
    ours = _errors(out, ref64)
    torch_errs = _errors(attn.reference(x), ref64)
    floor = 4 * torch.finfo(dtype).eps * ref64.abs().max().item()
    for mine, theirs, what in zip(ours, torch_errs, ("max", "rms"), strict=True):
        assert mine <= max(2 * theirs, floor), f"{what} error {mine:.3g} vs torch {theirs:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n", "h", "dh", "head_tile"), CASES)
def test_matches_fp64_within_torch_error(
    b: int, n: int, h: int, dh: int, head_tile: str, dtype: torch.dtype, device: str
) -> None:
    _check_within_torch(_qkv(b, n, h, dh), dtype, device, head_tile=head_tile)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peaked_softmax(dtype: torch.dtype, device: str) -> None:
    """Large scores (|s| up to ~100): the running max must rescale across key blocks."""
    _check_within_torch(_qkv(1, 200, 1, 64, scale=3.0, seed=1), dtype, device)


def test_reads_linear_output_view(device: str) -> None:
    """The model's layout: nn.Linear output reshaped to (B, N, 3, H, Dh), read in place."""
    torch.manual_seed(0)
    b, n, h, dh = 2, 100, 2, 72
    linear = nn.Linear(h * dh, 3 * h * dh).to(device)
    x = torch.randn(b, n, h * dh, device=device)
    qkv = linear(x).reshape(b, n, 3, h, dh)
    assert qkv.stride(-1) == 1 and not qkv.permute(2, 0, 3, 1, 4).is_contiguous()
    torch.testing.assert_close(attn.attention(qkv), attn.reference(qkv))


def test_model_attention_module(device: str) -> None:
    """skip_dit.Attention with the triton path equals its torch path (digits-tiny: 32 / 2)."""
    torch.manual_seed(0)
    module = Attention(hidden_size=32, num_heads=2).to(device).eval()
    x = torch.randn(3, 16, 32, device=device)
    with torch.no_grad():
        expected = module(x)
        module.kernels.backend = "triton"
        got = module(x)
    torch.testing.assert_close(got, expected)


def test_strided_view(device: str) -> None:
    """Any strides but the last: every other token of a larger projection output."""
    big = _qkv(1, 130, 2, 16).to(device=device, dtype=torch.float32)
    qkv = big[:, ::2]  # (1, 65, 3, 2, 16), token stride doubled
    torch.testing.assert_close(attn.attention(qkv), attn.reference(qkv))


def test_empty(device: str) -> None:
    out = attn.attention(torch.zeros(2, 0, 3, 2, 16, device=device))
    assert out.shape == (2, 0, 32)


@pytest.mark.parametrize(
    ("qkv", "match"),
    [
        (torch.zeros(2, 7, 3, 32), r"\(B, N, 3, H, Dh\), got shape \(2, 7, 3, 32\)"),
        (torch.zeros(2, 7, 2, 2, 16), r"got shape \(2, 7, 2, 2, 16\)"),
        (torch.zeros(2, 7, 3, 16, 2).transpose(3, 4), r"unit stride on Dh, got strides"),
        (torch.zeros(2, 7, 3, 2, 32)[..., :16], r"heads must be packed \(head stride Dh\)"),
        (torch.zeros(2, 7, 3, 2, 16, dtype=torch.float64), r"got torch.float64"),
        (torch.zeros(2, 7, 3, 2, 16, dtype=torch.int32), r"got torch.int32"),
        (torch.zeros(1, 1, 3, 1, 512), r"head dim must be in \[1, 256\], got 512"),
        (
            torch.zeros(4096, 1, 3, 16, 1),
            r"B\*H must be <= 65535 .*got shape \(4096, 1, 3, 16, 1\)",
        ),
    ],
    ids=["4d", "not-qkv", "stride", "heads-apart", "fp64", "int", "head-dim", "grid"],
)
def test_validation_errors(qkv: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attn.attention(qkv)


@pytest.mark.parametrize("dh", [72, 16])
def test_unknown_head_tile(dh: int) -> None:
    with pytest.raises(ValueError, match="head_tile must be 'pad' or 'split', got 'halve'"):
        attn.head_tiles(dh, "halve")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dh", "pad", "split"),
    [
        (72, (128, 0), (64, 16)),
        (64, (64, 0), (64, 0)),
        (16, (16, 0), (16, 0)),
        (8, (16, 0), (16, 0)),
    ],
)
def test_head_tiles(dh: int, pad: tuple[int, int], split: tuple[int, int]) -> None:
    assert attn.head_tiles(dh, "pad") == pad
    assert attn.head_tiles(dh, "split") == split
    assert math.log2(pad[0]).is_integer()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the interpreter switch")
def test_cpu_without_interpreter_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.KernelUnavailable, match="TRITON_INTERPRET=1"):
        attn.attention(torch.zeros(1, 4, 3, 1, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the interpreter's bf16")
def test_cpu_bf16_is_unavailable() -> None:
    """The interpreter's bf16 dots are silently wrong: refuse rather than return garbage."""
    with pytest.raises(dispatch.KernelUnavailable, match="bf16"):
        attn.attention(torch.zeros(1, 4, 3, 1, 16, dtype=torch.bfloat16))


def test_a_launch_makes_its_tensors_cuda_device_current() -> None:
    """Triton launches on the current CUDA device, so both launchers run under their input's
    device (a worker process may hold several GPUs); a CPU tensor changes nothing."""
    context = dispatch.on_device(torch.device("cuda", 1))  # made, not entered: no GPU needed
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(dispatch.on_device(torch.device("cpu")), contextlib.nullcontext)
