"""Small models and helpers shared by the tests."""

from __future__ import annotations

import operator

import fxlora
import torch
import torch.nn.functional as F
from fxlora.zoo import Conv1D  # GPT-2's Conv1D: x @ W + b with W stored (in, out)
from torch import nn


def randomize_lora(gm, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA parameter non-zero values, so adapted outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            p = gm.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def block_structured_B(B: torch.Tensor, mask, r: int, out: int) -> torch.Tensor:
    """``B`` as the ``(out, r*k)`` factor of an ``enable_lora`` site, written block by block (loralib
    MergedLinear's layout; independent of fxlora.lora); ``B`` itself without a mask of several slices."""
    if mask is None or len(mask) == 1:
        return B
    n, k = len(mask), sum(mask)
    o = out // n
    full = B.new_zeros(out, r * k)
    j = 0
    for g, enabled in enumerate(mask):
        if enabled:
            full[g * o : (g + 1) * o, j * r : (j + 1) * r] = B[j * o : (j + 1) * o]
            j += 1
    return full


def op_sequence(gm):
    return [(n.op, n.target) for n in gm.graph.nodes]


def count_calls(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return x + self.drop(self.proj(att @ v))


class TinyTransformer(nn.Module):
    """Embedding, blocks with a fused qkv Linear, a residual, an untied head."""

    def __init__(self, vocab: int = 40, d: int = 16, n_layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv1d(8, 6, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = x.mean(-1)
        x = self.c3(x)
        return self.fc(x.mean(-1))


class Functional(nn.Module):
    """Sites as functional calls on parameters, and one module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w1 = nn.Parameter(torch.randn(12, 8) * 0.1)
        self.proj = Conv1D(8, 12)
        self.w2 = nn.Parameter(torch.randn(8, 8) * 0.1)

    def forward(self, x):
        h = self.fc(self.fc(x))  # one module, two calls
        h = F.linear(h, self.w1)
        return self.proj(torch.tanh(h)) + operator.matmul(x, self.w2)


# --------------------------------------------------------------------------------------------- #
# The models the pass tests share: (factory, example inputs, rules)
# --------------------------------------------------------------------------------------------- #

CASES = {
    "transformer": (
        TinyTransformer,
        lambda: (torch.randint(0, 40, (2, 6)),),
        [
            fxlora.Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]),
            fxlora.Rule("re:blocks\\.\\d+\\.proj", r=3, alpha=3),
            fxlora.Rule(nn.Embedding, r=4, alpha=8),
            fxlora.Rule("head", r=2, alpha=2),
        ],
    ),
    "convnet": (ConvNet, lambda: (torch.randn(2, 3, 11, 11),), [fxlora.Rule("c*", r=2, alpha=4), fxlora.Rule("fc", r=1, alpha=1)]),
    "functional": (Functional, lambda: (torch.randn(3, 5, 8),), [fxlora.Rule("*", r=2, alpha=4)]),
}


def build_case(case):
    """``(model, inputs, rules)`` of ``CASES[case]``: the model seeded and in eval mode."""
    factory, inputs, rules = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    return model, inputs(), rules


class CompiledGraphs:
    """A ``torch.compile`` backend that keeps each graph Dynamo hands it and runs it as it is."""

    def __init__(self) -> None:
        self.graphs: list = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def count(self, name: str) -> int:
        """How many call_function nodes of the graphs so far have ``name`` in their target."""
        return sum(name in str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function")


def tiny_hf_gpt2(n_layer: int = 2, vocab_size: int = 100, n_positions: int = 64, tokens: int = 32):
    """A random-weight transformers ``GPT2LMHeadModel`` (width 32, 4 heads) in eval mode and a (2, tokens) batch
    of ids, both seeded; skips the test where transformers is not installed."""
    import pytest

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=n_positions,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    return model, ids
