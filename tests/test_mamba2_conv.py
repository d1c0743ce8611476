"""The Mamba-2 block's causal conv + SiLU (`aotlib.mamba2.CausalConvSiLU`) is nn.Conv1d's
depthwise causal convolution then F.silu: outputs and gradients, any length (l < k too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aotlib.mamba2 import D_CONV, causal_conv_silu


def reference(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The block's previous form: nn.Conv1d over (b, c, l), the first l outputs, SiLU."""
    l = x.shape[1]
    return F.silu(conv(x.transpose(1, 2))[..., :l].transpose(1, 2))


@pytest.mark.parametrize("l", [1, 2, 3, 4, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_conv_silu_matches_conv1d(l: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    b, c = 3, 7
    conv = nn.Conv1d(c, c, D_CONV, groups=c, padding=D_CONV - 1, bias=True).to(dtype)
    wide = torch.randn(b, l, 2 * c + 3, dtype=dtype)
    dout = torch.randn(b, l, c, dtype=dtype)

    def run(fn):
        src = wide.clone().requires_grad_(True)
        conv.zero_grad()
        out = fn(src[..., 2 : 2 + c], conv)  # a strided slice, as the block passes it
        out.backward(dout)
        return out, src.grad, conv.weight.grad.clone(), conv.bias.grad.clone()

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(run(causal_conv_silu), run(reference)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_causal_conv_silu_is_causal() -> None:
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 4, D_CONV, groups=4, padding=D_CONV - 1)
    x = torch.randn(2, 10, 4)
    y = causal_conv_silu(x, conv)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # change the future of t = 5
    assert torch.equal(causal_conv_silu(x2, conv)[:, :6], y[:, :6])
    assert not torch.equal(causal_conv_silu(x2, conv)[:, 6:], y[:, 6:])


@pytest.mark.parametrize("use_all", [True, False], ids=["all_parts", "one_part_unused"])
def test_causal_conv_silu_in_parts(use_all: bool) -> None:
    """With `sizes` it returns one contiguous tensor per group of channels (the block's
    x, B, C): the parts of the single output, and the same gradients, also when a part is
    not used."""
    torch.manual_seed(2)
    b, l, sizes = 2, 9, [5, 2, 2]
    conv = nn.Conv1d(9, 9, D_CONV, groups=9, padding=D_CONV - 1).double()
    x = torch.randn(b, l, 9, dtype=torch.float64)
    douts = [torch.randn(b, l, s, dtype=torch.float64) for s in sizes]

    def run(fn):
        src = x.clone().requires_grad_(True)
        conv.zero_grad()
        parts = fn(src)
        used = range(len(sizes)) if use_all else [0, 2]
        sum((parts[i] * douts[i]).sum() for i in used).backward()
        return [*parts, src.grad, conv.weight.grad.clone(), conv.bias.grad.clone()]

    got = run(lambda src: causal_conv_silu(src, conv, sizes))
    want = run(lambda src: reference(src, conv).split(sizes, dim=-1))
    assert all(p.is_contiguous() for p in got[: len(sizes)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
