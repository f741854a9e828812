"""Built-in model configurations: plain PyTorch, symbolically traceable, no downloads.

Two architectures with Hugging Face's module names, so rules written here carry over:

* :class:`Encoder`, a BERT/RoBERTa-style encoder (``encoder.layer.N.attention.self.query`` ...);
* :class:`GPT2`, a GPT-2-style decoder with fused ``c_attn`` projections in GPT-2's ``Conv1D``
  layout (weight stored ``(in, out)``, ``x @ W + b``) and an LM head tied to the token embedding.

:data:`PAPER` pairs the LoRA paper's configurations (Hu et al. 2021, tables 2-4) with their rules and
the trainable-parameter counts the architecture gives; :func:`paper_report` reproduces them (build
large ones on the ``meta`` device: no weight memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .rules import Rule

__all__ = [
    "Conv1D",
    "EncoderConfig",
    "Encoder",
    "GPT2Config",
    "GPT2",
    "roberta_base",
    "roberta_large",
    "deberta_v2_xxlarge",
    "gpt2_tiny",
    "gpt2_medium",
    "gpt2_large",
    "gpt3_175b",
    "resnet18",
    "PAPER",
    "PaperConfig",
]


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: a linear layer computing ``x @ W + b`` with ``W`` stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, s, d = x.shape
    return x.view(b, s, n_head, d // n_head).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, dh = x.shape
    return x.transpose(1, 2).reshape(b, s, h * dh)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --------------------------------------------------------------------------------------------- #
# Encoder (BERT / RoBERTa / DeBERTa shapes)
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 514
    type_vocab_size: int = 1
    num_labels: int = 0  # > 0 adds a classification head
    dropout: float = 0.1


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        return _merge_heads(self.dropout(_attend(q, k, v, None)))


class _Output(nn.Module):
    def __init__(self, d_in: int, d_out: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Output(c.hidden_size, c.hidden_size, c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c.intermediate_size, c.hidden_size, c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.dropout(self.LayerNorm(x))


class _Encoder(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class _ClassificationHead(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x[:, 0])))


class Encoder(nn.Module):
    """A BERT/RoBERTa-style encoder with Hugging Face's module names; returns the last hidden state
    (or logits when ``num_labels > 0``)."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or EncoderConfig()
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.classifier = _ClassificationHead(c) if c.num_labels > 0 else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embeddings(input_ids))
        return self.classifier(x) if self.classifier is not None else x


# --------------------------------------------------------------------------------------------- #
# GPT-2-style decoder
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.1


class _GPT2Attention(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = Conv1D(3 * c.n_embd, c.n_embd)
        self.c_proj = Conv1D(c.n_embd, c.n_embd)
        self.attn_dropout = nn.Dropout(c.dropout)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        s = x.shape[1]
        mask = x.new_ones((s, s), dtype=torch.bool).triu(1)
        att = _attend(_heads(q, self.n_head), _heads(k, self.n_head), _heads(v, self.n_head), mask)
        return self.resid_dropout(self.c_proj(_merge_heads(self.attn_dropout(att))))


class _GPT2MLP(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * c.n_embd, c.n_embd)
        self.c_proj = Conv1D(c.n_embd, 4 * c.n_embd)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class _GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = _GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = _GPT2MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _GPT2Transformer(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(_GPT2Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2(nn.Module):
    """A GPT-2-style causal LM (``GPT2LMHeadModel`` names); the LM head is tied to ``transformer.wte``."""

    def __init__(self, config: GPT2Config | None = None) -> None:
        super().__init__()
        c = self.config = config or GPT2Config()
        self.transformer = _GPT2Transformer(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(input_ids))


# --------------------------------------------------------------------------------------------- #
# Named configurations
# --------------------------------------------------------------------------------------------- #


def roberta_base(num_labels: int = 0) -> Encoder:
    return Encoder(EncoderConfig(num_labels=num_labels))


def roberta_large(num_labels: int = 0) -> Encoder:
    return Encoder(
        EncoderConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, num_labels=num_labels)
    )


def deberta_v2_xxlarge(num_labels: int = 0) -> Encoder:
    """DeBERTa-v2-XXLarge's shapes (d=1536, 48 layers, 24 heads, FFN 6144, vocabulary 128,100) in the
    plain encoder: the linear sites LoRA adapts have DeBERTa's shapes; its disentangled attention is
    not reproduced."""
    return Encoder(
        EncoderConfig(
            vocab_size=128100,
            hidden_size=1536,
            num_layers=48,
            num_heads=24,
            intermediate_size=6144,
            max_positions=512,
            num_labels=num_labels,
        )
    )


def gpt2_tiny() -> GPT2:
    """A small GPT-2 for demos and tests (4 layers, d=128, vocabulary 256)."""
    return GPT2(GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=4, n_head=4, dropout=0.0))


def gpt2_medium() -> GPT2:
    return GPT2(GPT2Config(n_embd=1024, n_layer=24, n_head=16))


def gpt2_large() -> GPT2:
    return GPT2(GPT2Config(n_embd=1280, n_layer=36, n_head=20))


def gpt3_175b() -> GPT2:
    """GPT-3 175B's shapes (d=12,288, 96 layers, 96 heads, context 2,048): build it on ``meta``."""
    return GPT2(GPT2Config(n_positions=2048, n_embd=12288, n_layer=96, n_head=96))


# --------------------------------------------------------------------------------------------- #
# ResNet-18 (torchvision's architecture and module names)
# --------------------------------------------------------------------------------------------- #


class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (same module names and state-dict keys)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            mods = [_BasicBlock(inplanes, planes, stride)] + [_BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 as torchvision builds it (``torchvision.models.resnet18`` loads its state dict)."""
    return ResNet((2, 2, 2, 2), num_classes)


@dataclass(frozen=True)
class PaperConfig:
    """A configuration of the LoRA paper: the model, the rules, and the trainable parameters."""

    factory: Callable[[], nn.Module]
    rules: tuple[Rule, ...]
    lora_params: int
    note: str = ""


def _qv(prefix: str, r: int, alpha: float) -> tuple[Rule, ...]:
    return (Rule(f"{prefix}.query", r=r, alpha=alpha), Rule(f"{prefix}.value", r=r, alpha=alpha))


_QV_FUSED = (True, False, True)

PAPER: dict[str, PaperConfig] = {
    "roberta-base": PaperConfig(roberta_base, _qv("encoder.layer.*.attention.self", 8, 8), 294_912),
    "roberta-large": PaperConfig(roberta_large, _qv("encoder.layer.*.attention.self", 8, 16), 786_432),
    "deberta-v2-xxlarge": PaperConfig(deberta_v2_xxlarge, _qv("encoder.layer.*.attention.self", 16, 32), 4_718_592),
    "gpt2-medium": PaperConfig(
        gpt2_medium,
        (Rule("transformer.h.*.attn.c_attn", r=4, alpha=32, enable_lora=_QV_FUSED),),
        393_216,
        "the paper prints 0.35M; the architecture (and loralib) gives 393,216",
    ),
    "gpt2-large": PaperConfig(
        gpt2_large,
        (Rule("transformer.h.*.attn.c_attn", r=4, alpha=32, enable_lora=_QV_FUSED),),
        737_280,
        "the paper prints 0.77M; the architecture gives 737,280",
    ),
    "gpt3-175b-r1": PaperConfig(
        gpt3_175b, (Rule("transformer.h.*.attn.c_attn", r=1, alpha=1, enable_lora=_QV_FUSED),), 4_718_592
    ),
    "gpt3-175b-r4": PaperConfig(
        gpt3_175b,
        (Rule("transformer.h.*.attn.c_attn", r=4, alpha=4, enable_lora=_QV_FUSED),),
        18_874_368,
        "36 MiB in bf16: the paper's 35MB checkpoint (vs 350GB)",
    ),
    "gpt3-175b-r8": PaperConfig(
        gpt3_175b, (Rule("transformer.h.*.attn.c_attn", r=8, alpha=8, enable_lora=_QV_FUSED),), 37_748_736
    ),
}
