"""`aotlib.native`'s C kernels against their references: Mamba-2's conv + SiLU and norms
(`aotlib/mamba2_cpu.c`) and the LM head's softmax cross-entropy (`aotlib/lm_head_cpu.c`)
in float32 next to the float64 definitions (as close as the torch forms in float32 are),
the switch that turns them off, the fallback when no compiler builds them, and a Mamba-2
training step with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aotlib import native
from aotlib.mamba2 import D_CONV, GatedRMSNorm, causal_conv_silu
from aotlib.models import linear_cross_entropy

needs_kernels = pytest.mark.skipif(
    native.library("mamba2_cpu") is None or native.library("lm_head_cpu") is None,
    reason="no C compiler built aotlib's kernels",
)


@pytest.fixture
def library_calls(monkeypatch) -> list[str]:
    """The names the Mamba-2 layers asked `aotlib.native` for (proof the kernel ran)."""
    calls, real = [], native.library

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(native, "library", spy)
    return calls


def conv_reference(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """nn.Conv1d over (b, c, l) with padding k-1, the first l outputs, then SiLU."""
    return F.silu(conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@needs_kernels
@pytest.mark.parametrize(
    "b, l, sizes",
    [(1, 1, [3]), (2, 3, [5]), (3, 4, [8, 2, 2]), (2, 37, [20, 7, 7]), (4, 64, [64, 16, 16])],
)
def test_native_conv_matches_the_float64_definition(library_calls, b, l, sizes) -> None:
    """Outputs and every gradient within float32 rounding of nn.Conv1d + SiLU in float64,
    for lengths below the kernel width, one step, channel counts that are no multiple of
    the vector width, and a strided input (a slice of a wider tensor, as the block has)."""
    k = D_CONV  # the kernel's width (Mamba-2's); others take the torch form, tested below
    torch.manual_seed(l)
    c = sum(sizes)
    conv64 = nn.Conv1d(c, c, k, groups=c, padding=k - 1).double()
    wide = torch.randn(b, l, c + 5, dtype=torch.float64) * 2
    douts = [torch.randn(b, l, s, dtype=torch.float64) for s in sizes]

    def run(conv, dtype, fn):
        src = wide.to(dtype).detach().requires_grad_(True)
        conv.zero_grad()
        parts = fn(src[..., 3 : 3 + c], conv)
        torch.autograd.backward(list(parts), [d.to(dtype) for d in douts])
        contiguous.append(all(p.is_contiguous() for p in parts))
        return [torch.cat(parts, -1), src.grad, conv.weight.grad, conv.bias.grad]

    contiguous = []

    want = run(conv64, torch.float64, lambda x, cv: conv_reference(x, cv).split(sizes, -1))
    conv32 = nn.Conv1d(c, c, k, groups=c, padding=k - 1)
    conv32.load_state_dict(conv64.state_dict())
    got = run(conv32, torch.float32, lambda x, cv: causal_conv_silu(x, cv, sizes))
    assert "mamba2_cpu" in library_calls
    assert contiguous[-1]  # one contiguous tensor per group of channels
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert rel_err(g, w) < 2e-6


@needs_kernels
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "residual"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_native_norm_matches_the_float64_definition(library_calls, groups, gated) -> None:
    """The gated norm, and without z the residual stream's RMSNorm."""
    torch.manual_seed(groups)
    d = 48
    x = torch.randn(3, 7, d, dtype=torch.float64)
    wide = torch.randn(3, 7, d + 5, dtype=torch.float64) * 3  # z: a strided slice
    weight = torch.rand(d, dtype=torch.float64) + 0.5
    dout = torch.randn(3, 7, d, dtype=torch.float64)

    def run(dtype, fn):
        xr, zr, wr = (t.to(dtype).detach().requires_grad_(True) for t in (x, wide, weight))
        out = fn(xr, zr[..., 2 : 2 + d] if gated else None, wr)
        out.backward(dout.to(dtype))
        return [out, xr.grad, wr.grad] + ([zr.grad] if gated else [])

    def plain(x, z, w):
        xs = (x if z is None else x * F.silu(z)).unflatten(-1, (groups, -1))
        return (xs / torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * w

    want = run(torch.float64, plain)
    got = run(torch.float32, lambda x, z, w: GatedRMSNorm.apply(x, z, w, d // groups, 1e-5))
    assert "mamba2_cpu" in library_calls
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert rel_err(g, w) < 2e-6


@needs_kernels
@pytest.mark.parametrize("n, V, rows", [(45, 70, 7), (64, 4096, 32), (9, 17, 1000)])
def test_native_cross_entropy_matches_the_float64_definition(library_calls, n, V, rows) -> None:
    """`linear_cross_entropy` (mean loss, dh, dW) against F.cross_entropy of the full
    logits in float64; vocabularies that are and are not multiples of the vector width,
    logits large enough that exp(l - max) underflows for most of a row."""
    gen = torch.Generator().manual_seed(V)
    h = torch.randn(n, 16, generator=gen, dtype=torch.float64) * 3
    W = torch.randn(V, 16, generator=gen, dtype=torch.float64) * 3
    tgt = torch.randint(V, (n,), generator=gen)

    def run(dtype, fn):
        hr, Wr = (t.to(dtype).detach().requires_grad_(True) for t in (h, W))
        out = fn(hr, Wr)
        (2 * out).backward()  # a non-unit upstream gradient
        return [out, hr.grad, Wr.grad]

    want = run(torch.float64, lambda h, W: F.cross_entropy(h @ W.t(), tgt))
    got = run(torch.float32, lambda h, W: linear_cross_entropy(h, W, tgt, rows))
    assert "lm_head_cpu" in library_calls
    with native.off():  # the torch form's float32 error (~2.4e-6 at V = 4096: the matmuls')
        torch_form = run(torch.float32, lambda h, W: linear_cross_entropy(h, W, tgt, rows))
    for g, t, w in zip(got, torch_form, want):
        assert g.dtype == torch.float32
        assert rel_err(g, w) < max(1.25 * rel_err(t, w), 1e-6)


@needs_kernels
def test_native_cross_entropy_rejects_a_target_outside_the_vocabulary() -> None:
    h, W = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        linear_cross_entropy(h, W, torch.tensor([0, 3, 10, 1]))


def test_off_runs_the_torch_forms(library_calls) -> None:
    conv = nn.Conv1d(6, 6, D_CONV, groups=6, padding=D_CONV - 1)
    x = torch.randn(2, 5, 6)
    enabled_before = native.enabled()
    with native.off():
        assert not native.enabled()
        y = causal_conv_silu(x, conv)
        GatedRMSNorm.apply(x, torch.randn(2, 5, 6), torch.ones(6), 3, 1e-5)
        linear_cross_entropy(x.view(10, 6), torch.randn(11, 6), torch.arange(10))
    assert library_calls == []
    assert native.enabled() == enabled_before  # the block ends, the kernels are back
    torch.testing.assert_close(y, conv_reference(x, conv), rtol=1e-5, atol=1e-6)


def test_torch_form_leaves_the_bias_alone_at_one_step() -> None:
    """b = l = 1: the pre-activation must be a new tensor, not the bias (which
    `expand(...).contiguous()` hands back as it is, and the taps then added into)."""
    conv = nn.Conv1d(4, 4, D_CONV, groups=4, padding=D_CONV - 1)
    bias = conv.bias.detach().clone()
    with native.off(), torch.no_grad():
        y = causal_conv_silu(torch.randn(1, 1, 4), conv)
    assert torch.equal(conv.bias.detach(), bias)
    assert y.shape == (1, 1, 4)


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert native.library("mamba2_cpu") is None
    assert native.library("mamba2_cpu") is None  # decided once: no second warning
    conv = nn.Conv1d(6, 6, D_CONV, groups=6, padding=D_CONV - 1)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(causal_conv_silu(x, conv), conv_reference(x, conv))


@needs_kernels
def test_a_compiler_without_the_cpu_level_builds_for_its_baseline(monkeypatch, tmp_path) -> None:
    """A compiler that refuses -march=x86-64-v3/v4 (older ones) still builds the kernels."""
    import shutil

    old_cc = tmp_path / "old-cc"
    old_cc.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in -march=*) echo "unknown march" >&2; exit 1;; esac; done\n'
        f'exec {shutil.which("cc")} "$@"\n'
    )
    old_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(old_cc))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    assert native.library("lm_head_cpu") is not None
    assert len(list((tmp_path / "native").glob("lm_head_cpu-*.so"))) == 1
    h, W, tgt = torch.randn(6, 8), torch.randn(20, 8), torch.randint(20, (6,))
    torch.testing.assert_close(linear_cross_entropy(h, W, tgt), F.cross_entropy(h @ W.t(), tgt))


@needs_kernels
def test_mamba2_step_with_and_without_kernels(library_calls) -> None:
    """A Mamba-2 LM's loss and every gradient: the kernels change them only at float32
    rounding (the numbers a training run stores move at that level, no more)."""
    from aotlib.models import build_model, model_config

    cfg = model_config("mamba2", "xs")
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # no dropout: the same function twice
    idx = torch.randint(cfg.vocab_size, (2, 40))

    def grads():
        model.zero_grad()
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, got = grads()
    assert "mamba2_cpu" in library_calls
    with native.off():
        loss_ref, want = grads()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())


def test_kernels_skip_what_they_do_not_cover(library_calls) -> None:
    """float64 tensors (and, by the same test, CUDA ones) take the torch forms."""
    conv = nn.Conv1d(6, 6, D_CONV, groups=6, padding=D_CONV - 1).double()
    causal_conv_silu(torch.randn(2, 5, 6, dtype=torch.float64), conv)
    assert library_calls == []
    assert native.kernels_for("mamba2_cpu", torch.zeros(2, dtype=torch.float64)) is None


def test_other_conv_widths_take_the_torch_form(library_calls) -> None:
    """The kernel is Mamba-2's width 4; a width-3 conv runs (and is right) in torch."""
    conv = nn.Conv1d(6, 6, 3, groups=6, padding=2)
    x = torch.randn(2, 9, 6, requires_grad=True)
    y = causal_conv_silu(x, conv)
    y.backward(torch.ones_like(y))
    assert library_calls == []
    x2 = x.detach().clone().requires_grad_(True)
    want = conv_reference(x2, conv)
    torch.testing.assert_close(y, want)
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(x.grad, x2.grad)


@needs_kernels
def test_bench_native_times_every_kernel_against_its_torch_form(capsys, library_calls) -> None:
    """`python -m aotlib.bench native` runs each case both ways and prints one row per
    case, with the two forms' largest difference at float32 rounding."""
    from aotlib.bench import native as bench

    assert bench.main(["--rounds", "1"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if "(" in line and "ms" not in line
    ]
    assert len(rows) == len(bench.CASES)
    assert all(float(row.split()[-1]) < 1e-5 for row in rows)
    assert {"mamba2_cpu", "lm_head_cpu"} <= set(library_calls)


def test_every_exported_kernel_has_a_signature() -> None:
    """Each non-static C function of every kernel file is declared in
    `native._SIGNATURES`: ctypes would pass an undeclared one's 64-bit pointers and sizes
    as 32-bit ints (a crash, found this way once), and a declared one must exist in C."""
    import re
    from pathlib import Path

    here = Path(native.__file__).parent
    for name, signatures in native._SIGNATURES.items():
        source = (here / f"{name}.c").read_text()
        exported = set(re.findall(r"^int (\w+)\(", source, flags=re.MULTILINE))
        assert exported == set(signatures), name
        for fn, argtypes in signatures.items():  # the C parameter count matches
            params = re.search(rf"^int {fn}\((.*?)\)", source, flags=re.MULTILINE | re.DOTALL)
            assert params.group(1).count(",") + 1 == len(argtypes), fn
