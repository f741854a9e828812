"""fxlora.ops: the LoRA linear custom ops against an independent float64 reference.

Every comparison uses the op's stated bound (``fxlora.ops`` docstring): an element may differ from
the exact result by at most ``(c·u + K·u_acc)`` times the same formula evaluated on absolute values,
with ``c`` the path's number of roundings.  The reference and the magnitudes come from plain
``F.linear`` math and autograd in float64, so nothing here reuses the op's own formulas.

The Triton tests run where Triton imports and either CUDA is available or ``TRITON_INTERPRET=1`` is
set (the interpreter runs the kernels on CPU tensors; shapes stay tiny there, and bfloat16 is tested
on CUDA only because the interpreter does not implement bfloat16 arithmetic).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from fxlora import ops
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24, torch.float64: 2**-53}
ROUNDINGS = {"triton": 2, "merged": 2, "addmm": 3, "composite": 4}
SCALE = 0.7  # not a power of two: scaling rounds


# --------------------------------------------------------------------------------------------------
# Reference and bound
# --------------------------------------------------------------------------------------------------


def reference(x, W, b, A_or_h, B, s, *, with_h=False):
    """The unfused formula, in whatever dtype it is given (float64 here)."""
    h = A_or_h if with_h else F.linear(x, A_or_h)
    return F.linear(x, W, b) + F.linear(h, B) * s


def reference_and_magnitude(tensors, dy, s, with_h):
    """The float64 reference output and gradients, and the same formulas on absolute values."""
    results = []
    for absolute in (False, True):
        leaves = []
        for t in tensors:
            leaf = None if t is None else t.detach().double()
            if leaf is not None:
                leaf = (leaf.abs() if absolute else leaf).requires_grad_(t.requires_grad)
            leaves.append(leaf)
        y = reference(*leaves, abs(s) if absolute else s, with_h=with_h)
        up = dy.double().abs() if absolute else dy.double()
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wanted, up) if wanted else ()
        results.append((y.detach(), list(grads)))
    return results


def assert_within_bound(actual, exact, magnitude, *, dtype, path, K, what):
    u = UNIT_ROUNDOFF[dtype]
    u_acc = 2**-53 if dtype == torch.float64 else 2**-24
    bound = (ROUNDINGS[path] * u + K * u_acc) * magnitude
    err = (actual.detach().double() - exact).abs()
    assert actual.shape == exact.shape, what
    worst = float((err / bound.clamp_min(1e-300)).max()) if err.numel() else 0.0
    assert bool((err <= bound).all()), f"{what}: error reaches {worst:.2f} x the bound ({path}, {dtype})"


def make_inputs(lead, n_in, n_out, r, dtype, *, bias=True, with_h=False, grad_weight=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, grad=True):
        return (torch.randn(shape, generator=g) * std).to(device, dtype).requires_grad_(grad)

    x = rand(*lead, n_in)
    W = rand(n_out, n_in, std=n_in**-0.5, grad=grad_weight)
    b = rand(n_out, grad=grad_weight) if bias else None
    A_or_h = rand(*lead, r) if with_h else rand(r, n_in, std=n_in**-0.5)
    B = rand(n_out, r, std=r**-0.5)  # non-zero, so the branch matters
    return [x, W, b, A_or_h, B]


def run_and_check(tensors, *, dtype, path, with_h):
    op = ops.lora_linear_h if with_h else ops.lora_linear
    y = op(*tensors, SCALE)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, dtype)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy)
    (y_ref, g_ref), (y_mag, g_mag) = reference_and_magnitude(tensors, dy, SCALE, with_h)
    x, W = tensors[0], tensors[1]
    K = max(W.shape[1], W.shape[0], x.numel() // x.shape[-1])
    assert_within_bound(y, y_ref, y_mag, dtype=dtype, path=path, K=K, what="output")
    names = [n for n, t in zip("x W b A B".split(), tensors) if t is not None and t.requires_grad]
    for name, g, ref, mag in zip(names, grads, g_ref, g_mag):
        assert_within_bound(g, ref, mag, dtype=dtype, path=path, K=K, what=f"grad of {name}")
    # The branch matters: the adapted output is not the base output.
    b = None if tensors[2] is None else tensors[2].double()
    assert not torch.allclose(y.double(), F.linear(x.double(), W.double(), b))


# --------------------------------------------------------------------------------------------------
# Composite paths (CPU)
# --------------------------------------------------------------------------------------------------

LEADS = [(5,), (2, 3), (2, 2, 3)]


@pytest.mark.parametrize("path", ["composite", "addmm"])
@pytest.mark.parametrize("with_h", [False, True], ids=["lora_linear", "lora_linear_h"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_forward_and_gradients_within_bound(path, with_h, dtype, lead):
    for bias, grad_weight in [(True, False), (False, True)]:
        tensors = make_inputs(lead, 24, 20, 4, dtype, bias=bias, with_h=with_h, grad_weight=grad_weight)
        with ops.use_path(path):
            run_and_check(tensors, dtype=dtype, path=path, with_h=with_h)


@pytest.mark.parametrize("with_h", [False, True], ids=["lora_linear", "lora_linear_h"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("grad_weight", [False, True], ids=["frozen", "trainable"])
def test_gradcheck(with_h, bias, grad_weight):
    op = ops.lora_linear_h if with_h else ops.lora_linear
    for path in ("composite", "addmm"):
        for lead in [(), (2, 3)]:
            tensors = make_inputs(lead, 5, 4, 2, torch.float64, bias=bias, with_h=with_h, grad_weight=grad_weight)
            with ops.use_path(path):
                assert torch.autograd.gradcheck(lambda *t: op(*t, SCALE), tuple(tensors))


def test_gradgradcheck():
    tensors = make_inputs((2, 3), 5, 4, 2, torch.float64, grad_weight=True)
    assert torch.autograd.gradgradcheck(lambda *t: ops.lora_linear(*t, SCALE), tuple(tensors))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, generator=g, dtype=torch.float64).transpose(0, 2)[..., ::2]  # (4, 3, 8)
    H = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    W = torch.randn(5, 16, generator=g, dtype=torch.float64)[:, ::2]  # (5, 8), stride 2
    A = torch.randn(2, 8, generator=g, dtype=torch.float64)
    B = torch.randn(2, 5, generator=g, dtype=torch.float64).t()  # (5, 2) transposed
    assert not x.is_contiguous() and not W.is_contiguous() and not B.is_contiguous()
    for path in ("composite", "addmm"):
        with ops.use_path(path):
            torch.testing.assert_close(ops.lora_linear(x, W, None, A, B, SCALE), reference(x, W, None, A, B, SCALE))
            h = H[..., 2:4]  # one sibling's slice of a shared shrink
            torch.testing.assert_close(
                ops.lora_linear_h(x, W, None, h, B, SCALE), reference(x, W, None, h, B, SCALE, with_h=True)
            )


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_h", [False, True], ids=["lora_linear", "lora_linear_h"])
def test_frozen_base_skips_weight_gradients(with_h):
    """With the base frozen (the usual case) backward computes neither dW nor db."""
    op = ops.lora_linear_h if with_h else ops.lora_linear
    counts = {}
    for grad_weight in (False, True):
        tensors = make_inputs((2, 3), 6, 4, 2, torch.float32, with_h=with_h, grad_weight=grad_weight)
        y = op(*tensors, SCALE)
        with _CountMatmuls() as mode:
            y.sum().backward()
        counts[grad_weight] = mode.calls
        assert (tensors[1].grad is not None) == grad_weight and (tensors[2].grad is not None) == grad_weight
    assert counts[True].count("mm") == counts[False].count("mm") + 1  # dW
    assert counts[True].count("sum") == counts[False].count("sum") + 1  # db


def test_opcheck():
    x, W, b, A, B = make_inputs((2, 3), 6, 4, 2, torch.float32, grad_weight=True)
    h = torch.randn(2, 3, 2, requires_grad=True)
    torch.library.opcheck(ops.lora_linear, (x, W, b, A, B, SCALE))
    torch.library.opcheck(ops.lora_linear, (x, W.detach(), None, A, B, SCALE))
    torch.library.opcheck(ops.lora_linear_h, (x, W, b, h, B, SCALE))
    torch.library.opcheck(ops.lora_gemm, (x[0], W.t(), b, h[0], B.t(), SCALE))
    torch.library.opcheck(ops.lora_shrink, (x[0], A, SCALE))


class _Attention(nn.Module):
    """Two sites: q with its own shrink, k and v sharing one ``x @ cat(A_k, A_v)^T``."""

    def __init__(self, d=8, r=2):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        for m in (self.q, self.k, self.v):
            m.requires_grad_(False)
        self.A_q, self.A_kv = nn.Parameter(torch.randn(r, d) * 0.3), nn.Parameter(torch.randn(2 * r, d) * 0.3)
        self.B_q, self.B_k, self.B_v = (nn.Parameter(torch.randn(d, r) * 0.3) for _ in range(3))
        self.r = r

    def forward(self, x):
        q = ops.lora_linear(x, self.q.weight, self.q.bias, self.A_q, self.B_q, 2.0)
        h_k, h_v = F.linear(x, self.A_kv).split(self.r, -1)
        k = ops.lora_linear_h(x, self.k.weight, None, h_k, self.B_k, 2.0)
        v = ops.lora_linear_h(x, self.v.weight, self.v.bias, h_v, self.B_v, 2.0)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def _grads(fn, model, x):
    model.zero_grad()
    out = fn(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compile_fullgraph():
    """``fullgraph=True`` raises on a graph break; outputs and gradients match eager."""
    torch.manual_seed(0)
    model = _Attention()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        x = torch.randn(batch, 5, 8)
        out, grads = _grads(model, model, x)
        out_c, grads_c = _grads(compiled, model, x)
        torch.testing.assert_close(out_c, out)
        for n in grads:
            torch.testing.assert_close(grads_c[n], grads[n])


def test_export():
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxlora.lora_linear.default) == 1
    assert targets.count(torch.ops.fxlora.lora_linear_h.default) == 2
    for batch in (2, 4):
        x = torch.randn(batch, 5, 8)
        torch.testing.assert_close(ep.module()(x), model(x))


def test_autocast_casts_like_f_linear():
    x, W, b, A, B = (t.detach() for t in make_inputs((3, 4), 8, 6, 2, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lora_linear(x, W, b, A, B, SCALE)
        ref = F.linear(x, W, b) + F.linear(F.linear(x, A), B) * SCALE
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=3e-2, rtol=2e-2)


def test_path_selection(monkeypatch):
    x = torch.randn(128, 64)
    assert ops.get_path() == "auto"
    assert ops.choose_path("gemm", x, 64, 8) == "addmm"  # CPU: always BLAS under "auto"
    assert ops.choose_path("gemm", x.half(), 64, 8) == "addmm"
    monkeypatch.setenv(ops.PATH_ENV, "composite")
    assert ops.get_path() == "composite" and ops.choose_path("gemm", x, 64, 8) == "composite"
    with ops.use_path("addmm"):
        assert ops.choose_path("shrink", x, 8, 8) == "addmm"
    assert ops.get_path() == "composite"
    monkeypatch.setenv(ops.PATH_ENV, "cublas")
    with pytest.raises(ops.LoraOpError, match="unknown LoRA op path 'cublas'"):
        ops.get_path()
    monkeypatch.delenv(ops.PATH_ENV)
    with pytest.raises(ops.LoraOpError):
        ops.set_path("fast")
    ops.counters.clear()
    with ops.use_path("composite"):
        ops.lora_linear(x, torch.randn(16, 64), None, torch.randn(4, 64), torch.randn(16, 4), 1.0)
    assert ops.counters == {"shrink.composite": 1, "gemm.composite": 1}


def test_bench_check_runs_on_cpu(capsys):
    """The benchmark's correctness check, on its CPU smoke-test shapes (no Triton needed)."""
    from fxlora.tools import bench_ops

    assert bench_ops.main(["--shapes", "tiny", "--check-only", "--device", "cpu"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_bad_arguments_name_the_problem():
    x, W, b, A, B = (t.detach() for t in make_inputs((3,), 8, 6, 2, torch.float32))
    with pytest.raises(ops.LoraOpError, match="A is \\(2, 7\\) but must be \\(r, in\\)"):
        ops.lora_linear(x, W, b, A[:, :7], B, 1.0)
    with pytest.raises(ops.LoraOpError, match="B is torch.float64 but x is torch.float32"):
        ops.lora_linear(x, W, b, A, B.double(), 1.0)
    with pytest.raises(ops.LoraOpError, match="h is"):
        ops.lora_linear_h(x, W, b, torch.randn(4, 2), B, 1.0)


# --------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or the CPU interpreter)
# --------------------------------------------------------------------------------------------------

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (_HAS_TRITON and (torch.cuda.is_available() or _INTERPRET)),
    reason="needs Triton and either CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# (M, K, N, r): ragged everywhere, one exact multiple of the blocks, degenerate M/N/r = 1.
TRITON_SHAPES = [(37, 50, 45, 5), (32, 32, 64, 16), (1, 20, 3, 1), (19, 48, 70, 20)]
if torch.cuda.is_available() and not _INTERPRET:
    TRITON_SHAPES += [(300, 520, 770, 16), (257, 2048, 384, 64), (130, 1000, 1030, 128)]


def _rand(*shape, dtype, g, std=1.0):
    return (torch.randn(shape, generator=g) * std).to(DEVICE, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_kernels_within_bound(dtype):
    from fxlora import triton_lora

    g = torch.Generator().manual_seed(0)
    for M, K, N, r in TRITON_SHAPES:
        X = _rand(M, 2 * K, dtype=dtype, g=g)
        x = X[:, ::2]  # strided rows and columns
        W = _rand(N, K, dtype=dtype, g=g, std=K**-0.5)
        A = _rand(r, K, dtype=dtype, g=g, std=K**-0.5)
        B = _rand(N, r, dtype=dtype, g=g, std=r**-0.5)
        bias = _rand(N, dtype=dtype, g=g)
        H = _rand(M, 3 * r, dtype=dtype, g=g)
        h = H[:, r : 2 * r]  # a sibling's slice of a shared shrink
        d = {k: v.double() for k, v in dict(x=x, W=W, A=A, B=B, bias=bias, h=h).items()}
        a = {k: v.abs() for k, v in d.items()}
        acc = max(M, K, N)

        got = triton_lora.lora_shrink(x, A, SCALE)
        assert got.shape == (M, r) and got.is_contiguous()
        exact, mag = SCALE * d["x"] @ d["A"].T, SCALE * a["x"] @ a["A"].T
        assert_within_bound(got, exact, mag, dtype=dtype, path="triton", K=acc, what=f"shrink {M, K, r}")

        for with_bias in (True, False):
            b, bd, ba = (bias, d["bias"], a["bias"]) if with_bias else (None, 0.0, 0.0)
            got = triton_lora.lora_gemm(x, W.t(), b, h, B.t(), SCALE)  # forward layout: w = W^T, e = B^T
            exact = d["x"] @ d["W"].T + bd + SCALE * d["h"] @ d["B"].T
            mag = a["x"] @ a["W"].T + ba + SCALE * a["h"] @ a["B"].T
            assert_within_bound(got, exact, mag, dtype=dtype, path="triton", K=acc, what=f"gemm {M, K, N, r}")

        dy = _rand(M, N, dtype=dtype, g=g)
        dh = h.contiguous()
        got = triton_lora.lora_gemm(dy, W, None, dh, A, 1.0)  # backward layout: dx = dy @ W + dh @ A
        exact = dy.double() @ d["W"] + d["h"] @ d["A"]
        mag = dy.double().abs() @ a["W"] + a["h"] @ a["A"]
        assert_within_bound(got, exact, mag, dtype=dtype, path="triton", K=acc, what=f"dx gemm {M, K, N, r}")


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("with_h", [False, True], ids=["lora_linear", "lora_linear_h"])
def test_triton_path_of_the_ops(dtype, with_h):
    ops.counters.clear()
    lead = (2, 19) if _INTERPRET else (4, 300)
    for bias, grad_weight in [(True, False), (False, True)]:
        tensors = make_inputs(lead, 40, 36, 6, dtype, bias=bias, with_h=with_h, grad_weight=grad_weight, device=DEVICE)
        with ops.use_path("triton"):
            run_and_check(tensors, dtype=dtype, path="triton", with_h=with_h)
    assert ops.counters["gemm.triton"] == (2 if with_h else 4)  # forward, plus dx for lora_linear
    assert ops.counters["gemm.addmm"] == ops.counters["shrink.addmm"] == 0


@needs_triton
def test_auto_prefers_triton_only_on_cuda():
    x = torch.randn(128, 64, dtype=torch.float16, device=DEVICE)
    expected = "triton" if x.is_cuda else "addmm"
    assert ops.choose_path("gemm", x, 64, 8) == expected
    assert ops.choose_path("gemm", x[:16], 64, 8) == "addmm"  # too few rows
    assert ops.choose_path("gemm", x.float(), 64, 8) == "addmm"  # float32: BLAS
    assert ops.choose_path("gemm", x, 64, 200) == "addmm"  # rank above the kernels' limit
