"""The first fold of a rewritten capture reuses the code fxlora generated for the captured graph: fold gives
that graph back, node for node, so no code is generated or compiled, and the folded module's graph is
built only when it is read.  Everything a fold returns must be what the fold that generates its code
returns."""

from __future__ import annotations

import copy
import pickle

import fxlora
import pytest
import torch
import torch.fx
from fxlora import export
from fxlora.folding import BASE_CODE
from torch import nn

from helpers import CASES, TinyTransformer, build_case, randomize_lora


def _signature(graph: torch.fx.Graph) -> list[tuple]:
    return [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs), sorted(n.meta), n.type) for n in graph.nodes]


def _modules(gm: nn.Module) -> list[tuple]:
    return [(name, type(m).__name__, m.training, sorted(m._non_persistent_buffers_set)) for name, m in gm.named_modules()]


class _CodeGenerated:
    """Counts the code torch.fx generates and compiles while it is active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.python_code = self.compiled = 0
        python_code, forward_from_src = torch.fx.Graph.python_code, torch.fx.graph_module._forward_from_src

        def counted_python_code(graph, *args, **kwargs):
            self.python_code += 1
            return python_code(graph, *args, **kwargs)

        def counted_forward_from_src(*args, **kwargs):
            self.compiled += 1
            return forward_from_src(*args, **kwargs)

        monkeypatch.setattr(torch.fx.Graph, "python_code", counted_python_code)
        monkeypatch.setattr(torch.fx.graph_module, "_forward_from_src", counted_forward_from_src)


def _rewrites(case: str, **options):
    """The same rewrite of a captured model twice: one that keeps the captured code, one that does not."""
    model, x, rules = build_case(case)
    captured = fxlora.capture(model)
    kept = fxlora.rewrite(captured, rules, **options)
    assert BASE_CODE in kept.__dict__
    generated = fxlora.rewrite(captured, rules, **options)
    del generated.__dict__[BASE_CODE]
    for gm in (kept, generated):
        randomize_lora(gm)
        gm.eval()
    return model, x, kept, generated


def _assert_same_fold(a, b, x) -> None:
    assert a.code == b.code
    torch.testing.assert_close(a(*x), b(*x), atol=0, rtol=0)
    assert _signature(a.graph) == _signature(b.graph)
    a.graph.lint()
    assert _modules(a) == _modules(b)
    assert list(a.state_dict()) == list(b.state_dict())
    assert sorted(a.__dict__) == sorted(b.__dict__)
    assert a.meta == b.meta
    assert a.graph.python_code("self").src == a.code  # the code reused is the graph's own


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_first_fold_of_a_rewritten_capture_generates_no_code_and_equals_one_that_does(case, monkeypatch):
    model, x, kept, generated = _rewrites(case)
    counter = _CodeGenerated(monkeypatch)
    folded = fxlora.fold(kept)
    assert (counter.python_code, counter.compiled) == (0, 0)
    assert "_graph" not in folded.__dict__  # built when first read
    monkeypatch.undo()
    _assert_same_fold(folded, fxlora.fold(generated), x)
    torch.testing.assert_close(folded(*x), kept(*x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"fuse_siblings": True},
        {"train_modules": ["blocks.0.ln"]},
        {"merge_on_eval": True},
        {"tied": "refuse", "bias": "all"},
    ],
    ids=["fuse_siblings", "train_modules", "merge_on_eval", "bias"],
)
def test_the_reused_code_is_the_fold_of_every_rewrite_option(options):
    model, x, kept, generated = _rewrites("transformer", **options)
    _assert_same_fold(fxlora.fold(kept), fxlora.fold(generated), x)
    if options.get("merge_on_eval"):
        torch.testing.assert_close(kept(*x), generated(*x), atol=0, rtol=0)


def test_a_rewrite_of_a_plan_keeps_the_plans_code(monkeypatch):
    model, x, rules = build_case("transformer")
    gm = fxlora.rewrite(fxlora.plan(model, rules))
    randomize_lora(gm)
    counter = _CodeGenerated(monkeypatch)
    folded = fxlora.fold(gm.eval())
    assert counter.compiled == 0
    monkeypatch.undo()
    torch.testing.assert_close(folded(*x), gm(*x), atol=1e-5, rtol=1e-5)
    assert folded.graph.python_code("self").src == folded.code


def test_only_code_that_is_the_base_graphs_is_reused(monkeypatch):
    model, x, rules = build_case("transformer")
    # a rewrite of a model (its capture generates no code), of a module traced by torch: the fold generates its code
    rewritten = fxlora.rewrite(model, rules)
    traced = fxlora.rewrite(torch.fx.symbolic_trace(model), rules)
    for gm in (rewritten, traced):
        assert BASE_CODE not in gm.__dict__
    # units: fold inlines them
    assert BASE_CODE not in fxlora.rewrite(fxlora.capture(model), rules, units="blocks.*").__dict__
    # a captured module whose code is no longer its graph's (edited, not recompiled)
    captured = fxlora.capture(model)
    node = next(n for n in captured.graph.nodes if n.op == "call_module")
    with captured.graph.inserting_after(node):
        captured.graph.call_function(torch.relu, (node,))
    assert BASE_CODE not in fxlora.rewrite(captured, rules).__dict__


def test_a_changed_rewritten_graph_folds_with_code_of_its_own():
    model, x, rules = build_case("transformer")
    gm = fxlora.rewrite(fxlora.capture(model), rules)
    randomize_lora(gm)
    gm.eval()
    # an edit of the base graph, recompiled: the fold follows it
    edited = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.softmax:
            node.target = torch.log_softmax
            edited += 1
    assert edited
    gm.recompile()
    folded = fxlora.fold(gm)
    assert "log_softmax" in folded.code
    torch.testing.assert_close(folded(*x), gm(*x), atol=1e-5, rtol=1e-5)


def test_adapters_switched_after_the_rewrite_fold_as_before():
    model, x, rules = build_case("transformer")
    gm = fxlora.rewrite(fxlora.capture(model), rules)
    fxlora.add_adapter(gm, [fxlora.Rule("head", r=1, alpha=1)], "other")
    randomize_lora(gm)
    gm.eval()
    for active in ("other", "default"):
        fxlora.set_adapter(gm, active)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(*x), gm(*x), atol=1e-5, rtol=1e-5)
        assert folded.graph.python_code("self").src == folded.code


def test_a_fold_whose_graph_was_not_read_copies_pickles_and_scripts(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = (torch.randint(0, 40, (2, 6)),)
    gm = fxlora.rewrite(fxlora.capture(model), CASES["transformer"][2])
    randomize_lora(gm)
    gm.eval()
    expected = gm(*x)
    made = [fxlora.fold(gm) for _ in range(6)]
    for folded in made:
        assert "_graph" not in folded.__dict__
    torch.testing.assert_close(copy.deepcopy(made[0])(*x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pickle.loads(pickle.dumps(made[1]))(*x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.jit.script(made[2])(*x), expected, atol=1e-5, rtol=1e-5)
    export.to_torchscript(made[3], x, tmp_path / "m.pt")
    export.to_exported_program(made[4], x, tmp_path / "m.pt2")
    export.to_onnx(made[5], x, tmp_path / "m.onnx")
    # the rewritten module and its template graph were not changed by any of it
    torch.testing.assert_close(gm(*x), expected, atol=0, rtol=0)
    assert made[0].graph is not made[1].graph


def test_the_rewritten_module_changed_after_a_fold_does_not_change_the_folds_graph():
    model, x, rules = build_case("transformer")
    gm = fxlora.rewrite(fxlora.capture(model), rules)
    randomize_lora(gm)
    gm.eval()
    folded = fxlora.fold(gm)
    code = folded.code
    fxlora.add_adapter(gm, [fxlora.Rule("head", r=1, alpha=1)], "other")
    fxlora.set_adapter(gm, "other")  # gm's graph changes in place
    assert folded.graph.python_code("self").src == code
    assert not any("lora" in str(n.target) for n in folded.graph.nodes)
