"""Long-skip fusion: ``fold`` algebra (pure torch) and the Triton kernel (the interpreter on CPU).

Accuracy is judged against an fp64 reference, within twice plain torch's own error at the same
dtype (``reference`` at that dtype vs fp64), with a floor of 4 fp32 ulps of the output's scale:
on a single narrow row torch's fp32 error can be ~1 ulp and the kernel's fp32 arithmetic, done
in another order, costs up to ~3 (measured over 20 seeds); negligible against fp16/bf16 errors.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch, lsc_fusion
from kernels.lsc_fusion import FoldedLSC, fold, folded_reference, reference

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def make_modules(d: int, d_out: int, dtype: torch.dtype, device: str, seed: int = 0):
    """A long skip's LayerNorm(2d) and Linear(2d -> d_out), with a non-trivial affine."""
    g = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(2 * d, eps=1e-6)
    linear = nn.Linear(2 * d, d_out)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(2 * d, generator=g))
        norm.bias.copy_(0.1 * torch.randn(2 * d, generator=g))
        bound = (2 * d) ** -0.5  # nn.Linear's default init range, drawn from g
        linear.weight.copy_(torch.rand(d_out, 2 * d, generator=g) * 2 * bound - bound)
        linear.bias.copy_(0.1 * torch.randn(d_out, generator=g))
    return norm.to(device, dtype), linear.to(device, dtype)


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, mean: float = 0.0):
    g = torch.Generator().manual_seed(1)
    x = mean + torch.randn(shape, generator=g)
    s = mean + torch.randn(shape, generator=g)
    return x.to(device, dtype), s.to(device, dtype)


def exact(x: torch.Tensor, s: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """fp64 reference of cat + LayerNorm + Linear on the same (rounded) inputs and weights."""
    h = torch.cat([x, s], dim=-1).double()
    w, b = norm.weight.double(), norm.bias.double()
    h = F.layer_norm(h, norm.normalized_shape, w, b, norm.eps)
    return F.linear(h, linear.weight.double(), linear.bias.double())


def assert_within_torch_error(y: torch.Tensor, x, s, norm, linear) -> None:
    """max |y - fp64| <= 2 * max |torch at x's dtype - fp64|, floor 4 fp32 ulps of the output."""
    want = exact(x, s, norm, linear)
    torch_err = (reference(x, s, norm, linear).double() - want).abs().max().item()
    err = (y.double() - want).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
    assert err <= max(2 * torch_err, floor), f"err {err:.3g} vs torch's {torch_err:.3g}"


# ----------------------------------------------------------------------------- fold (no triton)


@pytest.mark.parametrize("mean", [0.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fold_reproduces_reference_in_torch(dtype: torch.dtype, mean: float) -> None:
    norm, linear = make_modules(96, 80, dtype, "cpu")
    x, s = make_inputs((2, 7, 96), dtype, "cpu", mean)
    folded = fold(norm, linear)
    assert folded.weight.dtype == dtype and folded.weight.shape == (80, 192)
    assert folded.u.dtype == folded.c.dtype == torch.float32
    torch.testing.assert_close(folded.u, folded.weight.float().sum(1))
    y = folded_reference(x, s, folded)  # (2, 7, 80)
    assert y.dtype == dtype and y.shape == (2, 7, 80)
    assert_within_torch_error(y, x, s, norm, linear)


def test_fold_without_affine_or_bias() -> None:
    norm = nn.LayerNorm(64, elementwise_affine=False)
    linear = nn.Linear(64, 16, bias=False)
    x, s = make_inputs((5, 32), torch.float32, "cpu")
    folded = fold(norm, linear)
    torch.testing.assert_close(folded.weight, linear.weight)
    torch.testing.assert_close(folded.c, torch.zeros(16))
    want = linear(F.layer_norm(torch.cat([x, s], -1), (64,), eps=norm.eps))
    torch.testing.assert_close(folded_reference(x, s, folded), want, rtol=1e-5, atol=1e-5)


def test_fold_rejects_mismatched_widths() -> None:
    with pytest.raises(ValueError, match=r"\(128,\).*64"):
        fold(nn.LayerNorm(128), nn.Linear(64, 16))


# ----------------------------------------------------------------------------- kernel
# (the launcher checks run before any launch, but the module's kernel tests need triton)


@needs_triton
@pytest.mark.parametrize(
    "shape, d_out",
    [
        ((2, 5, 1152), 1152),  # DiT-XL width: 2d = 2304, 9 N-tiles each re-deriving the stats
        ((1, 1, 40), 24),  # one row, everything smaller than a block
        ((3, 37, 72), 50),  # M = 111, d and d_out not multiples of the blocks
        ((2, 70, 200), 300),  # several M, N and K tiles, all ragged
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, d_out: int, dtype: torch.dtype, device: str) -> None:
    norm, linear = make_modules(shape[-1], d_out, dtype, device)
    x, s = make_inputs(shape, dtype, device)
    y = lsc_fusion.lsc_fusion(x, s, fold(norm, linear))
    assert y.shape == (*shape[:-1], d_out) and y.dtype == dtype
    assert_within_torch_error(y, x, s, norm, linear)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_mean_against_spread(dtype: torch.dtype, device: str) -> None:
    """Mean 10, std 1: the uncentred one-pass form fails this at fp32 (see the module doc)."""
    norm, linear = make_modules(1152, 1152, dtype, device, seed=2)
    x, s = make_inputs((1, 16, 1152), dtype, device, mean=10.0)
    y = lsc_fusion.lsc_fusion(x, s, fold(norm, linear))
    assert_within_torch_error(y, x, s, norm, linear)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_outlier_channel_in_the_first_tile(dtype: torch.dtype, device: str) -> None:
    """One channel of x at 60 (a large activation, as trained DiTs have): the row shift taken
    from the first tile is far from most values, which the 16-bit dot must not round."""
    norm, linear = make_modules(256, 128, dtype, device, seed=3)
    x, s = make_inputs((2, 32, 256), dtype, device)
    x[..., 3] = 60.0
    y = lsc_fusion.lsc_fusion(x, s, fold(norm, linear))
    assert_within_torch_error(y, x, s, norm, linear)


@needs_triton
def test_views_with_unit_last_stride(device: str) -> None:
    """Slices of the last dim, ragged token slices and strided tokens run without a copy."""
    d, d_out = 48, 40
    norm, linear = make_modules(d, d_out, torch.float32, device)
    big, _ = make_inputs((3, 12, 2 * d + 8), torch.float32, device)  # (B, T, 2d + 8)
    folded = fold(norm, linear)
    cases = {
        "last-dim slices": (big[..., :d], big[..., d : 2 * d]),  # row stride 2d + 8
        "ragged tokens": (big[:, :-1, :d], big[:, 1:, d : 2 * d]),  # (outer, tokens) strides
        "strided tokens": (big[:, ::2, :d], big[:, 1::2, 8 : d + 8]),
    }
    for name, (x, s) in cases.items():
        y = lsc_fusion.lsc_fusion(x, s, folded)
        want = lsc_fusion.lsc_fusion(x.contiguous(), s.contiguous(), folded)
        # Equal in the interpreter; compiled code may sum a row's statistics in another order
        # for another layout, so a few ulp of the output's scale.
        ulp = torch.finfo(y.dtype).eps * want.abs().max().item()
        torch.testing.assert_close(y, want, rtol=0, atol=4 * ulp, msg=name)
        assert_within_torch_error(y, x, s, norm, linear)


@needs_triton
def test_empty_rows(device: str) -> None:
    norm, linear = make_modules(16, 8, torch.float32, device)
    x, s = make_inputs((2, 0, 16), torch.float32, device)
    assert lsc_fusion.lsc_fusion(x, s, fold(norm, linear)).shape == (2, 0, 8)


# ----------------------------------------------------------------------------- launcher checks


@pytest.fixture
def folded() -> FoldedLSC:
    norm, linear = make_modules(16, 8, torch.float32, "cpu")
    return fold(norm, linear)


def test_rejects_bad_layouts(folded: FoldedLSC) -> None:
    x, s = make_inputs((4, 16), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"x must have last-dim stride 1.*strides \(1, 4\)"):
        lsc_fusion.lsc_fusion(x.T.contiguous().T, s, folded)
    tangled = torch.randn(3, 5, 7, 16)[:2, :4, :6]  # no (outer, tokens) pair of strides fits
    with pytest.raises(ValueError, match=r"s's leading dims.*\(560, 112, 16, 1\)"):
        lsc_fusion.lsc_fusion(tangled.contiguous(), tangled, folded)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, s, f: (x, s[:, :8], f), r"same shape.*\[4, 16\].*\[4, 8\]"),
        (lambda x, s, f: (x[:, :8], s[:, :8], f), r"\(\*, 16\), got \(8, 32\)"),
        (lambda x, s, f: (x.half(), s.half(), f), r"share one of.*float16, torch.float16 and"),
        (lambda x, s, f: (x.int(), s.int(), f), r"got torch.int32, torch.int32"),
        (
            lambda x, s, f: (x, s, FoldedLSC(f.weight, f.u.double(), f.c, f.eps)),
            r"float32, got torch.float64",
        ),
        (
            lambda x, s, f: (x, s, FoldedLSC(f.weight, f.u[:4], f.c, f.eps)),
            r"\(8,\), got \(4,\) and \(8,\)",
        ),
        (lambda x, s, f: (x, s.to("meta"), f), r"one device, got \['cpu', 'meta'\]"),
    ],
)
def test_rejects_bad_inputs(folded: FoldedLSC, change, message: str) -> None:
    x, s = make_inputs((4, 16), torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        lsc_fusion.lsc_fusion(*change(x, s, folded))


def test_cpu_without_interpreter_is_unavailable(folded, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, s = make_inputs((4, 16), torch.float32, "cpu")
    with pytest.raises(dispatch.KernelUnavailable, match="lsc_fusion needs Triton"):
        lsc_fusion.lsc_fusion(x, s, folded)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter only")
def test_cpu_bf16_is_unavailable(folded) -> None:
    x, s = make_inputs((4, 16), torch.bfloat16, "cpu")
    bf16 = FoldedLSC(folded.weight.bfloat16(), folded.u, folded.c, folded.eps)
    with pytest.raises(dispatch.KernelUnavailable, match="bf16"):
        lsc_fusion.lsc_fusion(x, s, bf16)


def test_module_imports_and_folds_without_triton() -> None:
    """The base install has no triton: importing the module and folding must not need it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises
        "import torch; from torch import nn\n"
        "from kernels import lsc_fusion as L\n"
        "norm, lin = nn.LayerNorm(8), nn.Linear(8, 3); x = torch.randn(2, 4)\n"
        "f = L.fold(norm, lin)\n"
        "torch.testing.assert_close(L.folded_reference(x, x, f), L.reference(x, x, norm, lin))\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
