"""The pipeline: capture options, plans bound to their graph, and the passes under torch's PassManager."""

from __future__ import annotations

import fxlora
import pytest
import torch
from fxlora import passes
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from helpers import TinyTransformer, op_sequence, randomize_lora

RULES = [fxlora.Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), fxlora.Rule("head", r=3, alpha=3)]


def test_plan_is_bound_to_its_graph_and_rewrite_applies_it():
    torch.manual_seed(0)
    model = TinyTransformer()
    plan = fxlora.plan(model, RULES)
    assert isinstance(plan, fxlora.Plan) and [s.name for s in plan] == ["blocks.0.qkv", "blocks.1.qkv", "head"]
    assert isinstance(plan.graph_module, torch.fx.GraphModule) and plan.mismatch(plan.graph_module) is None
    calls = {n.name for n in plan.graph_module.graph.nodes}
    assert all(call in calls for site in plan for call, _ in site.calls)  # keyed by node name

    gm = fxlora.rewrite(plan)  # twice from one plan: the plan's graph is copied, not consumed
    again = fxlora.rewrite(plan)
    direct = fxlora.rewrite(model, RULES)
    assert op_sequence(gm) == op_sequence(direct) == op_sequence(again)
    assert list(fxlora.lora_state_dict(gm)) == list(fxlora.lora_state_dict(direct))
    assert not any("fxlora" in n.meta for n in plan.graph_module.graph.nodes)  # the plan's graph is untouched
    randomize_lora(direct)
    fxlora.load_lora_state_dict(gm, fxlora.lora_state_dict(direct))
    x = torch.randint(0, 40, (2, 5))
    assert torch.equal(gm(x), direct(x))

    with pytest.raises(fxlora.ArgumentError, match="applies the plan as it is"):
        fxlora.rewrite(plan, RULES)
    report = fxlora.report(plan)
    assert [r.name for r in report.rows] == [s.name for s in plan] and report.lora_params == fxlora.report(model, RULES).lora_params


def test_the_rewrite_pass_refuses_a_plan_made_for_another_graph():
    plan = fxlora.plan(TinyTransformer(), RULES)
    other = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(passes.PassContractError, match="the plan was made for another graph"):
        passes.rewrite(other, plan)


def test_plan_without_rules_lists_the_candidates():
    plan = fxlora.plan(TinyTransformer())
    assert len(plan) == 0 and {c.name for c in plan.candidates if c.kind} >= {"emb", "blocks.0.qkv", "head"}
    with pytest.raises(fxlora.RuleError, match="selects no site"):
        fxlora.rewrite(plan)


def test_shadowed_rules_are_shown_by_the_report():
    rules = [fxlora.Rule("blocks.*.qkv", r=2, alpha=2), fxlora.Rule("blocks.0.qkv", r=4, alpha=4), fxlora.Rule(nn.Linear, r=1, alpha=1)]
    plan = fxlora.plan(TinyTransformer(), rules)
    site = next(s for s in plan if s.name == "blocks.0.qkv")
    assert site.rule is rules[1] and site.shadowed == (rules[0], rules[2])  # exact beats pattern beats type
    report = fxlora.report(TinyTransformer(), rules)
    text = report.render()
    assert "note: 'blocks.0.qkv' is also selected by Rule('blocks.*.qkv', r=2, alpha=2), Rule(torch.nn." in text
    assert "which lose to the rule Rule('blocks.0.qkv', r=4, alpha=4)" in text
    row = next(r for r in report.to_dict()["sites"] if r["name"] == "blocks.0.qkv")
    assert row["shadowed"] == [repr(rules[0]), repr(rules[2])]


def test_capture_options_are_one_value_with_keyword_conveniences():
    model = TinyTransformer()
    opts = fxlora.CaptureOptions(method="symbolic", leaf_modules=["blocks.0"])
    gm = fxlora.capture(model, capture=opts)
    assert gm.meta["fxlora_capture"] == "symbolic_trace"
    assert any(n.op == "call_module" and n.target == "blocks.0" for n in gm.graph.nodes)  # kept opaque
    for fn in (fxlora.capture, lambda m, **kw: fxlora.plan(m, RULES, **kw), lambda m, **kw: fxlora.rewrite(m, RULES, **kw),
               lambda m, **kw: fxlora.report(m, RULES, **kw)):
        with pytest.raises(fxlora.ArgumentError, match="unexpected keyword arguments leaf_module;"):
            fn(model, leaf_module=[nn.LayerNorm])
        with pytest.raises(fxlora.ArgumentError, match="capture method must be one of"):
            fn(model, capture="jit")
        with pytest.raises(fxlora.ArgumentError, match="example_inputs must be a tuple"):
            fn(model, example_inputs=torch.zeros(2))
    for fn in (fxlora.plan, fxlora.rewrite, fxlora.report):  # one rule for extra positional arguments
        with pytest.raises(fxlora.ArgumentError, match="takes the capture options as keywords, and nothing positional"):
            fn(model, RULES, (torch.zeros(2, 3),))
    with pytest.raises(fxlora.ArgumentError, match="nothing positional but the model "):
        fxlora.capture(model, (torch.zeros(2, 3),))
    # keywords override the options they are given with; the method is spelled capture=
    traced_through = fxlora.capture(model, capture=opts, leaf_modules=())
    assert not any(n.op == "call_module" and n.target == "blocks.0" for n in traced_through.graph.nodes)
    with pytest.raises(fxlora.ArgumentError, match="unexpected keyword arguments method;"):
        fxlora.capture(model, method="export")


def test_passes_run_under_torchs_pass_manager():
    torch.manual_seed(0)
    model = TinyTransformer()
    plan = fxlora.plan(model, [fxlora.Rule("blocks.*.qkv", r=2, alpha=2), fxlora.Rule("blocks.*.proj", r=2, alpha=2),
                               fxlora.Rule("head", r=2, alpha=2)])
    gm = fxlora.capture(plan.graph_module)
    manager = PassManager([passes.RewritePass(plan), passes.FuseSiblings()], steps=4, run_checks_after_each_pass=True)
    result = manager(gm)
    assert result.modified and set(fxlora.graph_sites(result.graph_module)) == {s.name for s in plan}
    # run again: nothing left to do, and every pass says so
    assert manager(result.graph_module).modified is False
    assert passes.RewritePass(plan)(result.graph_module).modified is False
    assert passes.FuseSiblings()(result.graph_module).modified is False
    folded = PassManager([passes.FoldPass()])(result.graph_module)
    assert folded.modified and not fxlora.graph_sites(folded.graph_module)
    assert op_sequence(folded.graph_module) == op_sequence(torch.fx.symbolic_trace(model))
    assert passes.FoldPass()(folded.graph_module).modified is False
    assert passes.make_mode_aware(folded.graph_module).modified is False  # nothing torch.export fixed here
