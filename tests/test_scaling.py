"""Scaling: capture does constant work per parameter read (tracing stays linear in depth), its graph is
torch.fx's own, and a Llama-7B-shaped model on the meta device is rewritten and reported.

The timings themselves are measured by ``python -m fxlora.tools.bench_scale`` (docs/performance.md); the
tests here check behaviour, with a generous time bound at most."""

from __future__ import annotations

import time

import fxlora
import pytest
import torch
from fxlora import zoo
from torch import nn

from helpers import op_sequence


class _ReadsItsWeights(nn.Module):
    """Layers that read their parameters and buffers as attributes (``x @ self.w``), one of them tied,
    and a plain tensor attribute: the reads the tracer resolves to names."""

    def __init__(self, n: int, shared: nn.Parameter) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.shared = shared
        self.register_buffer("scale", torch.full((4,), 0.5))
        self.offset = torch.ones(4)  # not a buffer: a constant of the graph

    def forward(self, x):
        return (x @ self.w + x @ self.shared) * self.scale + self.offset


class _Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        shared = nn.Parameter(torch.randn(4, 4))
        self.layers = nn.ModuleList(_ReadsItsWeights(i, shared) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _targets(graph):
    return [(n.op, str(n.target)) for n in graph.nodes]


@pytest.mark.parametrize("factory", [lambda: _Stack(3), zoo.gpt2_tiny])
def test_the_captured_graph_is_torch_fx_s_own(factory):
    # fxlora's tracer names parameter and buffer reads from a table instead of torch's search; same graph
    torch.manual_seed(0)
    model = factory().eval()
    ours = fxlora.capture(model, capture="symbolic")
    theirs = torch.fx.symbolic_trace(model)
    assert _targets(ours.graph) == _targets(theirs.graph)
    x = torch.randn(2, 4) if isinstance(model, _Stack) else torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(ours(x), model(x), rtol=0, atol=0)


def test_tracing_reads_the_parameter_list_once_not_once_per_read(monkeypatch):
    # torch's Tracer.getattr walks every parameter of the root for each parameter a module reads: quadratic
    # in depth.  Count the walks: a constant number, whatever the depth.
    walks = {"n": 0}
    original = nn.Module.named_parameters

    def counting(self, *args, **kwargs):
        walks["n"] += 1
        return original(self, *args, **kwargs)

    counts = []
    for n in (4, 16):
        model = zoo.GPT2(zoo.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=n, n_head=2, dropout=0.0))
        walks["n"] = 0
        monkeypatch.setattr(nn.Module, "named_parameters", counting)
        fxlora.capture(model, capture="symbolic")
        monkeypatch.setattr(nn.Module, "named_parameters", original)
        counts.append(walks["n"])
    assert counts[0] == counts[1], counts


def test_a_rewritten_deep_model_folds_to_its_base_graph():
    # the same check the benchmark makes before timing, at a depth CI affords
    model = zoo.GPT2(zoo.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=24, n_head=2, dropout=0.0)).eval()
    rules = [fxlora.Rule(f"transformer.h.*.{p}", r=4, alpha=8) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    gm = fxlora.rewrite(model, rules).eval()
    assert len(fxlora.graph_sites(gm)) == 4 * 24
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            gm.get_parameter(name).normal_(0, 0.1)
    x = torch.randint(0, 64, (2, 8))
    folded = fxlora.fold(gm)
    assert op_sequence(folded) == op_sequence(fxlora.capture(model, capture="symbolic"))
    torch.testing.assert_close(folded(x), gm(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(folded(x), model(x), atol=1e-3)


def _count_code_generation(monkeypatch):
    calls = {"n": 0}
    original = torch.fx.Graph.python_code

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Graph, "python_code", counting)
    return calls


def test_rewrite_and_fold_generate_code_once(monkeypatch):
    # GraphModule generates code when it is built and at each recompile: a rewrite builds its module without
    # code and generates it once, from the rewritten graph; a first fold once, from the folded graph
    model = zoo.gpt2_tiny().eval()
    rules = [fxlora.Rule("transformer.h.*.attn.c_attn", r=2, alpha=4)]
    calls = _count_code_generation(monkeypatch)
    gm = fxlora.rewrite(model, rules)
    assert calls["n"] == 1
    folded = fxlora.fold(gm)
    assert calls["n"] == 2
    fxlora.fold(gm)
    assert calls["n"] == 2  # the folded structure is cached: no code is generated
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(folded(x), gm.eval()(x))
    # rewrite(plan) too; capture and plan hand back modules that run
    the_plan = fxlora.plan(model, rules)
    calls["n"] = 0
    fxlora.rewrite(the_plan)
    assert calls["n"] == 1
    torch.testing.assert_close(the_plan.graph_module(x), model(x))
    torch.testing.assert_close(fxlora.capture(model)(x), model(x))
    assert "def forward" in fxlora.capture(model).code


def test_an_export_capture_is_given_code_once(monkeypatch):
    pytest.importorskip("transformers")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.1)  # made mode-aware: the capture changes the exported graph

        def forward(self, x):
            return self.drop(self.fc(x))

    model, x = Net().eval(), torch.randn(2, 4)
    calls = _count_code_generation(monkeypatch)
    module = torch.export.ExportedProgram.module

    def counted_module(self, *args, **kwargs):  # torch.export and ep.module() generate code of their own
        out = module(self, *args, **kwargs)
        calls["n"] = 0
        return out

    monkeypatch.setattr(torch.export.ExportedProgram, "module", counted_module)
    gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=2, alpha=2)], capture="export", example_inputs=(x,))
    # then fxlora's calling convention, the mode-aware dropout and the rewrite change the graph: code once
    assert calls["n"] == 1
    torch.testing.assert_close(gm(x), model(x))
    captured = fxlora.capture(model, capture="export", example_inputs=(x,))
    torch.testing.assert_close(captured(x), model(x))


LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000)


def test_llama_7b_on_meta_is_rewritten_and_reported():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(**LLAMA_7B, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    rules = [fxlora.Rule("model.layers.*.self_attn.*_proj", r=16, alpha=32), fxlora.Rule("model.layers.*.mlp.*_proj", r=16, alpha=32)]
    ids = torch.zeros((1, 16), dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    gm = fxlora.rewrite(model, rules, capture="export", example_inputs=(ids,), example_kwargs={"use_cache": False})
    rep = fxlora.report(gm)
    seconds = time.perf_counter() - t0
    # the counts, from the architecture alone: a site (d_in -> d_out) of rank r has r * (d_in + d_out) parameters
    h, i, layers, vocab, r = 4096, 11008, 32, 32000, 16
    shapes = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]  # q k v o (32 kv heads: k and v are h -> h), gate up down
    assert len(rep.rows) == layers * len(shapes)
    assert rep.lora_params == layers * sum(r * (a + b) for a, b in shapes) == 39_976_960
    assert rep.base_params == 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h == 6_738_415_616
    assert all(p.device.type == "meta" for p in gm.parameters())  # no weight memory, LoRA factors included
    assert seconds < 120, seconds  # the 5 s target is measured by fxlora.tools.bench_scale; this catches a blow-up


def test_the_garbage_collector_is_paused_while_graphs_are_built_and_given_back_as_it_was(monkeypatch):
    import gc

    states = []
    export = torch.export.export

    def export_watching_gc(*args, **kwargs):  # torch's own work runs with the collector as the user set it
        states.append(("export", gc.isenabled()))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export_watching_gc)
    rewrite_pass = fxlora.passes.RewritePass.call

    def call_watching_gc(self, gm):
        states.append(("rewrite pass", gc.isenabled()))
        return rewrite_pass(self, gm)

    monkeypatch.setattr(fxlora.passes.RewritePass, "call", call_watching_gc)
    model, x = nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            gm = fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2)], capture="export", example_inputs=(x,))
            fxlora.fold(gm)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    assert states == [("export", True), ("rewrite pass", False), ("export", False), ("rewrite pass", False)]
