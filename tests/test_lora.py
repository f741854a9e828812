"""The LoRA math of each kind: branch(x) == base_op(x, delta), shapes, initialisation."""

from __future__ import annotations

import copy
import math

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora.lora import delta_weight
from torch import nn

from helpers import op_sequence, randomize_lora

CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv1d_reflect": (lambda: nn.Conv1d(4, 6, 3, padding=2, padding_mode="reflect", dilation=2), (2, 4, 9)),
    "conv2d_stride_dilation": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11, 11)),
    "conv2d_same_circular": (lambda: nn.Conv2d(4, 6, (3, 5), padding="same", padding_mode="circular"), (2, 4, 8, 9)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (2, 2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_branch_equals_conv_with_the_folded_delta(case):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    groups = model[0].groups
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=4 if groups <= 4 else groups, alpha=8)])
    randomize_lora(gm)
    x = torch.randn(*shape)
    unmerged = gm(x)
    assert not torch.allclose(unmerged, model(x), atol=1e-4)
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), unmerged, atol=1e-5, rtol=1e-5)
    assert op_sequence(folded) == op_sequence(torch.fx.symbolic_trace(model))
    spec = fxlora.graph_sites(gm)["0"]
    A, B = gm.get_parameter("0.lora_A"), gm.get_parameter("0.lora_B")
    W = model[0].weight
    assert A.shape == (4, W.shape[1], *W.shape[2:]) and B.shape == (W.shape[0], 4 // groups, *[1] * (W.dim() - 2))
    assert delta_weight(A, B, spec).shape == W.shape


def test_functional_conv_site():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.k, None, 1, 1)

    torch.manual_seed(0)
    model = M()
    gm = fxlora.rewrite(model, [fxlora.Rule("k", r=2, alpha=2)])
    randomize_lora(gm)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)
    assert set(fxlora.lora_state_dict(gm)) == {"k_lora_A", "k_lora_B"}


def test_initialisation_follows_loralib():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 64), nn.Conv1d(64, 4, 1))  # rewritten, not run
    gm = fxlora.rewrite(model, [fxlora.Rule("*", r=4, alpha=4)])
    A = gm.get_parameter("1.lora_A")
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(gm.get_parameter("1.lora_B")) == 0
    assert torch.count_nonzero(gm.get_parameter("0.lora_A")) == 0  # Embedding: A zero, B normal
    assert gm.get_parameter("0.lora_B").std() > 0.5
    assert torch.count_nonzero(gm.get_parameter("2.lora_B")) == 0


def test_lora_parameters_take_the_base_dtype_and_device():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2)])
    assert gm.get_parameter("0.lora_A").dtype == torch.bfloat16


def test_custom_leaf_module_with_a_2d_weight():
    from helpers import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.Tanh(), Conv1D(4, 12))
    rules = [fxlora.Rule("*", r=2, alpha=2, fan_in_fan_out=True)]
    gm = fxlora.rewrite(model, rules, leaf_modules=[Conv1D])
    assert sum(n.op == "call_module" and n.target in ("0", "2") for n in gm.graph.nodes) == 2
    randomize_lora(gm)
    x = torch.randn(3, 8)
    traced_through = fxlora.rewrite(model, rules)  # the same model traced through Conv1D (addmm sites)
    fxlora.load_lora_state_dict(traced_through, fxlora.lora_state_dict(gm))
    torch.testing.assert_close(gm(x), traced_through(x))
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- #
# Transposed convolutions: a true low-rank branch that folds
# --------------------------------------------------------------------------------------------- #

CONV_TRANSPOSES = {
    "1d_stride_padding_output_padding": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=3, padding=2, output_padding=2), (2, 4, 7), 4),
    "1d_dilation_groups": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False), (2, 4, 7), 4),
    "2d_all": (lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(2, 1), groups=2), (2, 4, 5, 6), 4),
    "2d_depthwise": (lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4), (2, 4, 5, 5), 8),
    "3d": (lambda: nn.ConvTranspose3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 1)), (2, 2, 3, 4, 4), 2),
}


def _conv_transpose_reference(W, A, B, groups, scale):
    """W + scale * (per group) sum_j A[i, j, k] B[o, j], written with loops over groups and indices."""
    W = W.detach().clone()
    in_g, out_g, r_g = W.shape[0] // groups, W.shape[1], A.shape[1]
    for g in range(groups):
        for i in range(in_g):
            for o in range(out_g):
                a = A[g * in_g + i]  # (r/g, *kernel)
                b = B[g * out_g + o].reshape(r_g, *[1] * (W.dim() - 2))
                W[g * in_g + i, o] += (a * b).sum(0) * scale
    return W


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("case", sorted(CONV_TRANSPOSES))
def test_conv_transpose_branch_is_low_rank_and_folds(case, capture):
    make, shape, r = CONV_TRANSPOSES[case]
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    x = torch.randn(*shape)
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=r, alpha=2 * r)], capture=capture, example_inputs=(x,))
    spec = fxlora.graph_sites(gm)["0"]
    conv = model[0]
    assert spec.kind == "conv_transpose" and spec.op["output_padding"] == tuple(conv.output_padding)
    A, B = gm.get_parameter("0.lora_A"), gm.get_parameter("0.lora_B")
    W = conv.weight
    assert A.shape == (W.shape[0], r // conv.groups, *W.shape[2:]) and B.shape == (W.shape[1] * conv.groups, r // conv.groups, *[1] * (W.dim() - 2))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    randomize_lora(gm, std=0.3)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[0].weight.copy_(_conv_transpose_reference(W, A.detach(), B.detach(), conv.groups, 2.0))
        assert not torch.allclose(ref(x), model(x), atol=1e-3)
        torch.testing.assert_close(gm(x), ref(x), atol=1e-5, rtol=1e-5)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_weight(A, B, spec) + W, ref[0].weight, atol=1e-6, rtol=1e-6)


def test_functional_conv_transpose_site():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)  # (in, out/groups, kH, kW), groups=2

        def forward(self, x):
            return F.conv_transpose2d(x, self.k, None, stride=2, padding=1, output_padding=1, groups=2, dilation=1)

    torch.manual_seed(0)
    model = M()
    x = torch.randn(1, 4, 5, 5)
    for capture in ("symbolic", "export"):
        gm = fxlora.rewrite(model, [fxlora.Rule("k", r=2, alpha=2)], capture=capture, example_inputs=(x,))
        assert fxlora.graph_sites(gm)["k"].kind == "conv_transpose"
        randomize_lora(gm, std=0.3)
        A, B = gm.get_parameter("k_lora_A").detach(), gm.get_parameter("k_lora_B").detach()
        ref = F.conv_transpose2d(x, _conv_transpose_reference(model.k, A, B, 2, 1.0), None, 2, 1, 1, 2, 1)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fxlora.fold(gm)(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(fxlora.RuleError, match="r=3 is not divisible"):
        fxlora.rewrite(model, [fxlora.Rule("k", r=3, alpha=2)])


# --------------------------------------------------------------------------------------------- #
# MoE experts: a 3-D weight read per expert
# --------------------------------------------------------------------------------------------- #

E, IN, OUT = 3, 5, 6


class LoopExperts(nn.Module):
    """JetMoe-style: ``F.linear(x[e], W[e])`` for each expert, unrolled in the graph."""

    stored_in_out = False

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, OUT, IN) * 0.3)

    def forward(self, x):  # x: (E, tokens, in)
        return torch.stack([F.linear(x[e], self.W[e]) for e in range(E)])


class GatherBmmExperts(nn.Module):
    """transformers' batched_mm: the weight gathered per token-expert pair, then ``bmm(W[ids], x)``."""

    stored_in_out = False

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, OUT, IN) * 0.3)

    def forward(self, x):  # x: (S, in)
        ids = (x.sum(-1) > 0).long() + (x[:, 0] > 0).long()  # routing computed in the graph
        return torch.bmm(self.W[ids], x.unsqueeze(-1)).squeeze(-1)


class GroupedExperts(nn.Module):
    """transformers' grouped_mm: tokens sorted by expert, ``_grouped_mm(x, W.transpose(-2, -1), offs)``.
    ``torch._grouped_mm`` needs 16-byte aligned strides: 16 and 32 features (and a rank of 8) are."""

    stored_in_out = False
    dims = (16, 32)

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, 32, 16) * 0.3)
        self.register_buffer("counts", torch.tensor([2, 3, 2], dtype=torch.int32))

    def forward(self, x):  # x: (S, in), rows sorted by expert
        offs = torch.cumsum(self.counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, self.W.transpose(-2, -1), offs=offs)


class EinsumExperts(nn.Module):
    stored_in_out = False

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, OUT, IN) * 0.3)

    def forward(self, x):  # x: (E, tokens, in)
        return torch.einsum("etd,eod->eto", x, self.W)


class TransposedBmmExperts(nn.Module):
    """Llama4-style: the weight stored (experts, in, out), ``bmm(x.view(E, -1, in), W)``."""

    stored_in_out = True

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, IN, OUT) * 0.3)

    def forward(self, x):
        return torch.bmm(x.view(E, -1, IN), self.W)


EXPERTS = {  # case: (module, input shape, r)
    "loop_linear": (LoopExperts, (E, 4, IN), 2),
    "gather_bmm": (GatherBmmExperts, (7, IN), 2),
    "grouped_mm": (GroupedExperts, (7, 16), 8),
    "einsum": (EinsumExperts, (E, 4, IN), 2),
    "transposed_bmm": (TransposedBmmExperts, (E, 4, IN), 2),
}


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("case", sorted(EXPERTS))
def test_experts_get_a_per_expert_branch_indexed_like_the_weight(case, capture):
    cls, shape, r = EXPERTS[case]
    n_in, n_out = getattr(cls, "dims", (IN, OUT))
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    # aten._grouped_mm's meta kernel takes bf16 only on CPU (transformers then uses its own custom op for
    # fp32): the export capture of that case runs in bf16
    dtype = torch.bfloat16 if case == "grouped_mm" and capture == "export" else torch.float32
    model, x = model.to(dtype), x.to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    gm = fxlora.rewrite(model, [fxlora.Rule("W", r=r, alpha=2 * r, dropout=0.1)], capture=capture, example_inputs=(x,), dynamic_shapes=None)
    spec = fxlora.graph_sites(gm)["W"]
    assert spec.kind == "experts" and spec.fan_in_fan_out == cls.stored_in_out
    assert (spec.in_features, spec.out_features) == (n_in, n_out)
    A, B = gm.get_parameter("W_lora_A"), gm.get_parameter("W_lora_B")
    assert A.shape == (E, r, n_in) and B.shape == (E, n_out, r)  # PEFT target_parameters' per-expert factors
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    randomize_lora(gm, std=0.3)
    delta = torch.bmm(B.detach().float(), A.detach().float()) * 2.0  # (E, out, in), written independently
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.W.copy_(ref.W.float() + (delta.transpose(-2, -1) if cls.stored_in_out else delta))
        assert not torch.allclose(ref(x), model(x), atol=1e-1 if dtype == torch.bfloat16 else 1e-3)
        torch.testing.assert_close(gm(x), ref(x), **tol)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(x), ref(x), **tol)
    torch.testing.assert_close(folded.get_parameter("W"), ref.W, atol=1e-6, rtol=1e-6)
    # the branch never builds an (experts, out, in) update: no branch node has the weight's size
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    weight_sized = [
        n.name for n in gm.graph.nodes
        if "fxlora" in n.meta and n.meta["fxlora"]["role"] != "base" and "tensor_meta" in n.meta
        and getattr(n.meta["tensor_meta"], "shape", None) is not None and n.meta["tensor_meta"].shape.numel() >= E * n_in * n_out
    ]
    assert not weight_sized, weight_sized
    # gradients reach every expert's factors that the routing used
    gm.train()
    gm(x).square().sum().backward()
    assert A.grad is not None and B.grad.abs().sum() > 0


def test_experts_rules_and_messages():
    model = GroupedExperts()
    with pytest.raises(fxlora.RuleError, match="enable_lora applies only to linear"):
        fxlora.rewrite(model, [fxlora.Rule("W", r=8, alpha=2, enable_lora=[True, False])])
    with pytest.raises(fxlora.RuleError, match="contradicts fan_in_fan_out=True"):
        fxlora.rewrite(model, [fxlora.Rule("W", r=8, alpha=2, fan_in_fan_out=True)])
    with pytest.raises(fxlora.RuleError, match="r=2 .* multiple of 4"):  # fp32: 16-byte strides need r % 4 == 0
        fxlora.rewrite(model, [fxlora.Rule("W", r=2, alpha=2)])
    gm = fxlora.rewrite(model, [fxlora.Rule("W", r=4, alpha=2, fan_in_fan_out=False)])
    assert fxlora.graph_sites(gm)["W"].kind == "experts"


def test_conv_transpose_as_aten_convolution():
    """A decomposed ATen graph spells the transposed conv aten.convolution(..., transposed=True, output_padding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)).eval()
    x = torch.randn(2, 4, 5, 5)
    decomposed = torch.export.export(model, (x,), strict=False).run_decompositions().module()
    assert any(n.target is torch.ops.aten.convolution.default for n in decomposed.graph.nodes)
    gm = fxlora.rewrite(decomposed, [fxlora.Rule("0", r=2, alpha=2)])
    spec = fxlora.graph_sites(gm)["0"]
    assert spec.kind == "conv_transpose" and spec.op["output_padding"] == (1, 1) and spec.op["groups"] == 2
    randomize_lora(gm, std=0.3)
    A, B = gm.get_parameter("0.lora_A").detach(), gm.get_parameter("0.lora_B").detach()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[0].weight.copy_(_conv_transpose_reference(model[0].weight, A, B, 2, 1.0))
        torch.testing.assert_close(gm(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), ref(x), atol=1e-5, rtol=1e-5)


class _OutputSize(nn.Module):
    """A grouped ConvTranspose2d called with output_size (which sets output_padding from the input's shape)."""

    def __init__(self):
        super().__init__()
        self.c = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)

    def forward(self, x):
        return self.c(x, output_size=[10, 10])  # 5x5 -> 9x9 without output_padding: output_padding (1, 1)


def test_conv_transpose_called_with_output_size_under_export():
    torch.manual_seed(0)
    model, x = _OutputSize(), torch.randn(2, 4, 5, 5)
    rule = fxlora.Rule("c", r=2, alpha=4)
    # dynamic shapes (the default; capture="auto" falls back to export too): output_padding is computed in the graph
    for capture in ("export", "auto"):
        with pytest.raises(fxlora.RuleError, match=r"computes its output_padding in the graph.*dynamic_shapes=None"):
            fxlora.rewrite(model, [rule], capture=capture, example_inputs=(x,))
    # static shapes: output_padding is fixed, and the branch uses it
    gm = fxlora.rewrite(model, [rule], capture="export", example_inputs=(x,), dynamic_shapes=None)
    (spec,) = fxlora.graph_sites(gm).values()
    assert spec.kind == "conv_transpose" and spec.op["output_padding"] == (1, 1)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    randomize_lora(gm, std=0.3)
    A, B = gm.get_parameter(spec.lora_A).detach(), gm.get_parameter(spec.lora_B).detach()
    W = model.c.weight.detach()  # (in, out/g, kh, kw)
    delta = torch.zeros_like(W)
    for g in range(2):  # an independent reference: per group, delta[i, o] = sum_j A[i, j] * B[o, j] * alpha / r
        i, o = slice(2 * g, 2 * g + 2), slice(3 * g, 3 * g + 3)
        for a in range(2):
            for b in range(3):
                delta[i][a, b] = sum(A[i][a, j] * B[o][b, j, 0, 0] for j in range(A.shape[1])) * 2.0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.c.weight.add_(delta)
        expected = reference(x)
        assert expected.shape == (2, 6, 10, 10) and not torch.allclose(expected, model(x), atol=1e-3)
        torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), expected, atol=1e-5, rtol=1e-5)


def _recorded_ops(module, x, *, backward: bool) -> list[tuple[str, int]]:
    """Every ATen op one call of ``module`` (and its backward, when asked) runs, with the number of elements
    of its largest result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
            seen.append((func.overloadpacket.__name__, max(sizes, default=0)))
            return out

    if backward:
        x = x.detach().requires_grad_()
        with Record():
            module(x).sum().backward()
    else:
        with Record(), torch.no_grad():
            module(x)
    return seen


def _activation_ops(module, x, rows: int, width: int) -> list[str]:
    """The ATen ops of a forward (and backward) whose result has at least ``rows * width`` elements."""
    return sorted(name for name, size in _recorded_ops(module, x, backward=True) if size >= rows * width)


@pytest.mark.parametrize("mask", [[True, False, True], [False, True, False], [True, True, True]])
def test_split_lora_costs_what_a_plain_branch_of_rank_r_times_k_costs(mask):
    """enable_lora with k of n slices enabled: the forward and backward make no activation-sized zeros,
    slices or concatenations: on activation-sized tensors they run exactly the ops of a plain branch of
    rank r*k (its B block-structured, built from the k blocks: out x r*k elements)."""
    d, r, rows = 24, 4, 64
    torch.manual_seed(0)
    qkv = nn.Linear(d, 3 * d)
    split = fxlora.rewrite(nn.Sequential(copy.deepcopy(qkv)), [fxlora.Rule("0", r=r, alpha=8, enable_lora=mask)])
    plain = fxlora.rewrite(nn.Sequential(copy.deepcopy(qkv)), [fxlora.Rule("0", r=r * sum(mask), alpha=8)])
    x = torch.randn(rows, d)
    for gm in (split, plain):
        randomize_lora(gm)
    # a slice of the output is the smallest activation-sized tensor either could make
    assert _activation_ops(split, x, rows, d) == _activation_ops(plain, x, rows, d)
    # building the block-structured B costs a few small ops, each launched from the host every forward:
    # at most one per slice (its block, or an empty placeholder) and one to place them
    extra = len(_recorded_ops(split, x, backward=False)) - len(_recorded_ops(plain, x, backward=False))
    assert 0 <= extra <= len(mask) + 1, (extra, _recorded_ops(split, x, backward=False))
    B = split.get_parameter("0.lora_B")
    assert tuple(B.shape) == (d * sum(mask), r)  # compact: the k enabled slices' blocks
