"""The work fxlora.rewrite does on a captured graph: each piece done once, and done the way torch would."""

from __future__ import annotations

import copy
import operator

import fxlora
import pytest
import torch
from fxlora.tracing import copy_graph

from helpers import TinyTransformer


def _captures():
    model = TinyTransformer()
    idx = torch.randint(0, 40, (2, 5))
    symbolic = fxlora.capture(model, capture="symbolic")
    exported = fxlora.capture(model, capture="export", example_inputs=(idx,))
    rewritten = fxlora.rewrite(exported, [fxlora.Rule("blocks.*.qkv", r=2, alpha=4)])
    return {"symbolic": symbolic, "export": exported, "rewritten": rewritten}


@pytest.mark.parametrize("which", ["symbolic", "export", "rewritten"])
def test_copy_graph_is_deepcopy(which):
    gm = _captures()[which]
    theirs, ours = copy.deepcopy(gm.graph), copy_graph(gm.graph)
    ours.lint()
    assert ours.python_code("self").src == theirs.python_code("self").src
    assert type(ours._codegen) is type(theirs._codegen) and ours._codegen is not gm.graph._codegen
    assert ours._tracer_cls is theirs._tracer_cls
    for a, b, original in zip(theirs.nodes, ours.nodes, gm.graph.nodes, strict=True):
        assert (b.op, b.name, b.target, b.type) == (a.op, a.name, a.target, a.type)
        assert b.graph is ours
        assert b.meta == original.meta and b.meta is not original.meta
        assert [u.name for u in b.users] == [u.name for u in a.users]
        assert [n.name for n in b.all_input_nodes] == [n.name for n in a.all_input_nodes]
    # the copy's nodes are its own: editing it leaves the original alone
    before = str(gm.graph)
    for node in ours.nodes:
        node.meta["copied"] = True
    assert str(gm.graph) == before and not any("copied" in n.meta for n in gm.graph.nodes)


def _graph_record(gm):
    return [
        (n.op, n.name, str(n.target), repr(n.args), repr(n.kwargs), {k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta")})
        for n in gm.graph.nodes
    ]


@pytest.mark.parametrize("case", ["transformer", "convnet", "functional"])
@pytest.mark.parametrize("how", ["symbolic", "export"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_replayed_branches_are_the_recorded_ones(case, how, dropout, monkeypatch):
    """The rewrite pass records a kind's math on proxies once per spec less its names and replays it at the
    other sites: the graph, every node's name and metadata, the factors and the outputs are those of recording
    the math at every site."""
    from fxlora.passes import counters
    from fxlora.passes import rewrite_pass

    from helpers import build_case

    model, x, rules = build_case(case)
    rules = [fxlora.Rule(r.target, r=r.r, alpha=r.alpha, enable_lora=r.enable_lora, dropout=dropout) for r in rules]
    captured = fxlora.capture(model, capture=how, example_inputs=x)
    before = dict(counters["rewrite"])
    torch.manual_seed(0)
    ours = fxlora.rewrite(captured, rules)
    replayed = counters["rewrite"]["branches_replayed"] - before.get("branches_replayed", 0)
    recorded = counters["rewrite"]["branches_recorded"] - before.get("branches_recorded", 0)
    monkeypatch.setattr(rewrite_pass.Recordings, "find", lambda self, spec: None)
    torch.manual_seed(0)
    reference = fxlora.rewrite(captured, rules)
    ours.graph.lint()
    assert ours.code == reference.code
    assert _graph_record(ours) == _graph_record(reference)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    assert all(torch.equal(ours_state[k], v) for k, v in reference_state.items())
    branches = sum(1 for n in ours.graph.nodes if (fxlora.provenance.node_info(n) or {}).get("role") == "add")
    assert recorded >= 1 and recorded + replayed == branches
    if case == "transformer":  # two blocks: each block's qkv and proj replay the first block's
        assert replayed >= 2
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(ours):
            ours.get_parameter(name).normal_(0, 0.1)
            reference.get_parameter(name).copy_(ours.get_parameter(name))
        ours.eval()
        reference.eval()
        assert torch.equal(ours(*x), reference(*x))


def test_lookups_in_a_block_without_module_changes_walk_each_path_once(monkeypatch):
    from fxlora import sites

    model = TinyTransformer()
    steps = []
    original = sites._registered_child
    monkeypatch.setattr(sites, "_registered_child", lambda mod, item: steps.append(item) or original(mod, item))
    with sites.modules_unchanged():
        assert sites.get_parameter(model, "blocks.1.qkv.weight") is model.blocks[1].qkv.weight
        walked = len(steps)
        assert sites.get_parameter(model, "blocks.1.qkv.bias") is model.blocks[1].qkv.bias
        assert sites.get_submodule(model, "blocks.1.qkv") is model.blocks[1].qkv
        assert len(steps) == walked  # the path blocks.1.qkv was walked once
        with pytest.raises(AttributeError) as ours:
            sites.get_parameter(model, "blocks.1.qkv.nothing")
        with pytest.raises(AttributeError) as theirs:
            model.get_parameter("blocks.1.qkv.nothing")
        assert str(ours.value) == str(theirs.value)
        # parameters are read from the registry each time
        model.blocks[1].qkv.weight = torch.nn.Parameter(torch.zeros(48, 16))
        assert sites.get_parameter(model, "blocks.1.qkv.weight") is model.blocks[1].qkv.weight
    # outside the block nothing is remembered: a module replaced since is found
    model.blocks[1].qkv = torch.nn.Linear(16, 48)
    assert sites.get_parameter(model, "blocks.1.qkv.weight") is model.blocks[1].qkv.weight


def test_a_plan_remembers_nothing_after_it_is_made():
    from fxlora import sites

    model = TinyTransformer()
    fxlora.plan(model, [fxlora.Rule("blocks.*.qkv", r=2, alpha=4)])
    assert sites._FOUND.get() is None


def test_shadow_copy_gives_new_modules_and_parameters_over_the_same_storage():
    from fxlora.tracing import shadow_copy

    class Recording(torch.nn.Module):  # a class with its own __setattr__ sees the registries being set
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.register_buffer("count", torch.zeros(()))

        def __setattr__(self, name, value):
            self.__dict__.setdefault("_set", []).append(name)
            super().__setattr__(name, value)

    model = torch.nn.Sequential(TinyTransformer(), Recording())
    model[1].fc.register_forward_hook(lambda *a: None)
    model[0].head.weight = model[0].emb.weight  # tied: one new parameter for both
    copy_ = shadow_copy(model)
    for (name, ours), (_, theirs) in zip(copy_.named_modules(), model.named_modules(), strict=True):
        assert ours is not theirs and type(ours) is type(theirs), name
        for registry in ("_parameters", "_buffers", "_modules", "_forward_hooks"):
            assert getattr(ours, registry) is not getattr(theirs, registry)
            assert list(getattr(ours, registry)) == list(getattr(theirs, registry))
    for (name, ours), (_, theirs) in zip(copy_.named_parameters(), model.named_parameters(), strict=True):
        assert ours is not theirs and ours.data_ptr() == theirs.data_ptr() and ours.requires_grad == theirs.requires_grad
    assert copy_[0].head.weight is copy_[0].emb.weight
    assert copy_[1].count is not model[1].count and torch.equal(copy_[1].count, model[1].count)
    assert copy_[1]._set[-3:] == ["_parameters", "_buffers", "_modules"]
    copy_[1].fc.register_forward_hook(lambda *a: None)
    assert len(model[1].fc._forward_hooks) == 1
    # the other containers are the copy's own: a buffer made non-persistent in the copy is not so in the original
    copy_[1].register_buffer("scratch", torch.zeros(()), persistent=False)
    assert "scratch" not in model[1]._non_persistent_buffers_set
    model[1].register_buffer("scratch", torch.ones(()))
    assert "scratch" in model[1].state_dict() and "scratch" not in copy_[1].state_dict()


def test_a_graph_has_its_recorded_fingerprint_until_a_node_is_edited():
    from fxlora.tracing import _has_fingerprint, graph_fingerprint

    relu = torch.ops.aten.relu.default

    def the(graph, target):
        return next(n for n in graph.nodes if n.target is target or (isinstance(target, str) and n.target == target))

    def add_node(graph):
        with graph.inserting_after(the(graph, relu)):
            graph.call_function(relu, (the(graph, relu),))

    edits = {
        "nothing": lambda g: None,
        "rewired": lambda g: the(g, relu).update_arg(0, the(g, "y")),
        "retargeted": lambda g: setattr(the(g, relu), "target", torch.ops.aten.gelu.default),
        "renamed": lambda g: setattr(the(g, relu), "name", "renamed"),
        "added": add_node,
        "kwarg": lambda g: the(g, relu).update_kwarg("k", 1),
    }

    class Net(torch.nn.Module):
        def forward(self, x, y):
            return torch.relu(x * y) + y

    for what, edit in edits.items():
        graph = fxlora.capture(Net(), capture="export", example_inputs=(torch.ones(2), torch.ones(2))).graph
        recorded = graph_fingerprint(graph)
        edit(graph)
        assert _has_fingerprint(graph, recorded) == (graph_fingerprint(graph) == recorded) == (what == "nothing"), what


def test_the_rewrite_pass_ensures_every_call_has_its_branch(monkeypatch):
    from fxlora import passes
    from fxlora.passes import rewrite_pass

    plan = fxlora.plan(TinyTransformer(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=4)])
    skipped = plan.sites[1].calls[0][0]
    add_branch = rewrite_pass.add_branch
    monkeypatch.setattr(
        rewrite_pass, "add_branch", lambda gm, spec, node, *a: None if node.name == skipped else add_branch(gm, spec, node, *a)
    )
    with pytest.raises(passes.PassContractError, match=f"site '{plan.sites[1].name}' has a call without a branch"):
        passes.RewritePass(plan)(copy.deepcopy(plan.graph_module))
    # an add of the adapter that is not an operator.add call (another pass rewrote it) still counts
    monkeypatch.setattr(rewrite_pass, "add_branch", add_branch)
    gm = copy.deepcopy(plan.graph_module)
    rewrite_pass.RewritePass(plan).call(gm)
    for node in gm.graph.find_nodes(op="call_function", target=operator.add):
        node.target = torch.add
    rewrite_pass.RewritePass(plan).ensures(gm)


def test_a_rewrite_of_a_capture_copies_lints_and_generates_code_once(monkeypatch):
    """fxlora.rewrite(captured, rules): one copy of the graph (no deepcopy of it), one lint, one code generation."""
    from fxlora import tracing

    model = TinyTransformer()
    captured = fxlora.capture(model, capture="export", example_inputs=(torch.randint(0, 40, (2, 5)),))
    calls = {"copy_graph": 0, "deepcopy": 0, "lint": 0, "python_code": 0}

    def counting(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(tracing, "copy_graph", counting("copy_graph", tracing.copy_graph))
    monkeypatch.setattr(torch.fx.Graph, "__deepcopy__", counting("deepcopy", torch.fx.Graph.__deepcopy__))
    monkeypatch.setattr(torch.fx.Graph, "lint", counting("lint", torch.fx.Graph.lint))
    monkeypatch.setattr(torch.fx.Graph, "python_code", counting("python_code", torch.fx.Graph.python_code))
    gm = fxlora.rewrite(captured, [fxlora.Rule("blocks.*.qkv", r=2, alpha=4), fxlora.Rule("head", r=2, alpha=2)])
    assert calls == {"copy_graph": 1, "deepcopy": 0, "lint": 1, "python_code": 1}
    assert gm.graph is not captured.graph and len(fxlora.graph_sites(gm)) == 3
