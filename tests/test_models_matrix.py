"""The model matrix: 15 tiny random-weight transformers architectures (decoders, encoders,
encoder-decoders, vision, speech, MoE), each captured once (torch.export, static shapes) and shared by
its tests.

One rule, ``Rule("*")``, adapts every site fxlora finds in each model (linear projections whatever the
module class, embeddings, the tied embedding/LM-head weights, conv front ends, MoE experts), and for
each model the tests check: the rewrite is exact at init; with random factors the rewritten module
equals an *independent* reference (the model itself, with ``W + scale * B @ A`` written into its
weights by this file's own per-kind formula); the folded module equals it too, has the captured base
graph node for node, and its state dict loads into the user's model with ``strict=True``; the folded
module exports to ONNX and verifies in onnxruntime, called without a wrapper.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils import _pytree as pytree

transformers = pytest.importorskip("transformers")

import fxlora  # noqa: E402
from fxlora import Rule  # noqa: E402

from hf_models import MODELS, build  # noqa: E402
from helpers import op_sequence, randomize_lora  # noqa: E402

RULES = [Rule("*", r=2, alpha=4)]

#: site kinds each model must show (its distinctive sites)
EXPECTED_KINDS = {
    "gemma": {"linear", "tied"},
    "falcon": {"linear", "tied"},
    "bloom": {"linear", "tied"},
    "opt": {"linear", "tied", "embedding"},
    "t5": {"linear", "tied"},
    "bart": {"linear", "tied", "embedding"},
    "whisper": {"linear", "tied", "conv", "embedding"},
    "albert": {"linear", "tied", "embedding"},
    "vit": {"linear", "conv"},
    "clip": {"linear", "conv", "embedding"},
    "mixtral": {"linear", "experts", "embedding"},
    "qwen2_moe": {"linear", "experts", "embedding"},
}


def _delta(spec, A, B):
    """The update of ``spec``'s weight in the model's own layout, written here independently of fxlora.lora."""
    A, B, s = A.detach().double(), B.detach().double(), spec.scale
    if spec.kind == "linear":
        assert spec.enable_lora is None
        d = B @ A * s  # (out, in)
        return d.T if spec.fan_in_fan_out else d
    if spec.kind == "embedding":
        return (B @ A * s).T  # (num_embeddings, dim)
    if spec.kind == "tied":
        return B @ A * s  # (rows, cols): the weight as stored
    if spec.kind == "experts":
        d = torch.einsum("eor,eri->eoi", B, A) * s
        return d.transpose(1, 2) if spec.fan_in_fan_out else d
    if spec.kind == "conv":
        assert spec.op["groups"] == 1
        return torch.einsum("or,ri...->oi...", B.flatten(1), A) * s
    raise AssertionError(spec.kind)


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _close(a, b, atol=2e-5, rtol=1e-4):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@dataclass
class Case:
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    base: torch.fx.GraphModule  # the shared capture
    gm: torch.fx.GraphModule  # rewritten, LoRA factors random
    init_out: object
    base_out: object
    call_kwargs: dict = field(default_factory=dict)  # the tensors of kwargs: constants are defaults now
    _folded: object = None

    @property
    def folded(self):
        if self._folded is None:
            self._folded = fxlora.fold(self.gm).eval()
        return self._folded


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread; on a shared CI machine two threads spinning for
    kernels of a few microseconds made each forward pass ~100x slower (0.6 s instead of 6 ms for T5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases():
    return {}


def _case(name, cases) -> Case:
    if name not in cases:
        model, args, kwargs = build(name)
        # static shapes: a third of the capture time of Dim.AUTO (tests/test_models_hf.py covers dynamic ones)
        base = fxlora.capture(model, example_inputs=args, example_kwargs=kwargs, dynamic_shapes=None).eval()
        gm = fxlora.rewrite(base, RULES).eval()
        call_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            base_out = model(*args, **kwargs)
            init_out = gm(*args, **call_kwargs)
        randomize_lora(gm, seed=1, std=0.1)
        cases[name] = Case(model, args, kwargs, base, gm, init_out, base_out, call_kwargs)
    return cases[name]


NAMES = sorted(MODELS)


def test_the_matrix_covers_the_architectures():
    assert len(NAMES) >= 12
    assert {"mistral", "t5", "whisper", "vit", "mixtral", "qwen2_moe", "distilbert"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_rewrite_is_exact_at_init(name, cases):
    case = _case(name, cases)
    assert case.base.meta["fxlora_capture"] == "torch.export"
    kinds = {s.kind for s in fxlora.graph_sites(case.gm).values()}
    assert EXPECTED_KINDS.get(name, {"linear"}) <= kinds, kinds
    for got, want in zip(_leaves(case.init_out), _leaves(case.base_out)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_rewritten_and_folded_equal_an_independent_reference(name, cases):
    case = _case(name, cases)
    ref = copy.deepcopy(case.model)
    with torch.no_grad():
        for spec in fxlora.graph_sites(case.gm).values():
            W = ref.get_parameter(spec.weight)
            W.copy_((W.double() + _delta(spec, case.gm.get_parameter(spec.lora_A), case.gm.get_parameter(spec.lora_B))).to(W.dtype))
        expected = ref(*case.args, **case.kwargs)
        unmerged = case.gm(*case.args, **case.call_kwargs)
        assert not torch.allclose(_leaves(unmerged)[0], _leaves(case.base_out)[0], atol=1e-3)  # the branches are live
        _close(unmerged, expected)
        _close(case.folded(*case.args, **case.call_kwargs), expected)


@pytest.mark.parametrize("name", NAMES)
def test_folded_is_the_base_graph_and_loads_into_the_users_model(name, cases):
    case = _case(name, cases)
    folded = case.folded
    assert op_sequence(folded) == op_sequence(case.base)
    target = copy.deepcopy(case.model)
    target.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        _close(target(*case.args, **case.kwargs), folded(*case.args, **case.call_kwargs), atol=1e-6, rtol=1e-5)
    # tied weights stay tied in the folded module and in the model it loads into
    tied = {n for n, p in case.model.named_parameters(remove_duplicate=False)} - {n for n, _ in case.model.named_parameters()}
    for alias in tied:
        assert target.get_parameter(alias) is not None
    assert len(list(target.parameters())) == len(list(case.model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_folded_exports_to_onnx_and_verifies(name, cases, tmp_path):
    case = _case(name, cases)
    exported = fxlora.export.to_onnx(
        case.folded, case.args, tmp_path / f"{name}.onnx", example_kwargs=case.call_kwargs, optimize=False, atol=1e-4
    )
    assert exported.max_abs_diff <= 1e-4 and (tmp_path / f"{name}.onnx").exists()
