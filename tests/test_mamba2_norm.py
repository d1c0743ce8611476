"""The Mamba-2 block's gated norm (`aotlib.mamba2.GatedRMSNorm`, written-out backward) is
the plain ops' RMSNorm(x * SiLU(z)) per group, and without z the residual stream's
RMSNorm(x): outputs and every gradient, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aotlib.mamba2 import RMSNorm


def plain(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group: int, eps: float):
    """The definition, written out: gate (if any), then each group of channels over its rms."""
    xs = (x if z is None else x * F.silu(z)).unflatten(-1, (-1, group))
    return (xs / torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gated_norm_matches_its_definition(groups: int) -> None:
    torch.manual_seed(groups)
    d = 24
    norm = RMSNorm(d, group_size=d // groups).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, d, dtype=torch.float64)
    wide = torch.randn(3, 5, 2 * d + 3, dtype=torch.float64)  # z: a strided slice, as the
    dout = torch.randn(3, 5, d, dtype=torch.float64)  # block passes it

    def run(fn):
        xr, wr = x.clone().requires_grad_(True), wide.clone().requires_grad_(True)
        norm.zero_grad()
        out = fn(xr, wr[..., 1 : 1 + d])
        out.backward(dout)
        return out, xr.grad, wr.grad, norm.weight.grad.clone()

    got = run(norm)
    want = run(lambda x, z: plain(x, z, norm.weight, d // groups, norm.eps))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_fused_and_plain_forms_agree_in_float32() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, group_size=8)
    x, z = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    fused = norm(x, z)
    norm.fused = False
    torch.testing.assert_close(fused, norm(x, z), rtol=1e-6, atol=1e-6)
    assert fused.dtype == torch.float32


@pytest.mark.parametrize("groups", [1, 3])
def test_residual_norm_matches_its_definition(groups: int) -> None:
    """No gate (the residual stream's norms): the same written-out function with z None."""
    torch.manual_seed(10 + groups)
    d = 24
    norm = RMSNorm(d, group_size=d // groups).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, d, dtype=torch.float64)
    dout = torch.randn(3, 5, d, dtype=torch.float64)

    def run(fn):
        xr = x.clone().requires_grad_(True)
        norm.zero_grad()
        out = fn(xr)
        out.backward(dout)
        return out, xr.grad, norm.weight.grad.clone()

    got = run(norm)
    want = run(lambda x: plain(x, None, norm.weight, d // groups, norm.eps))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
