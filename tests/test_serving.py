"""fxlora.serve: one graph runs each sample of a batch with its own adapter, and trains that way too."""

from __future__ import annotations

import fxlora
import pytest
import torch
from fxlora import Rule

from helpers import TinyTransformer, randomize_lora

RULES = {
    "a": [Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), Rule("emb", r=3, alpha=3)],
    "b": [Rule("blocks.0.qkv", r=4, alpha=8, enable_lora=[True, True, False]), Rule("blocks.*.proj", r=3, alpha=6)],
    "c": [Rule("head", r=5, alpha=5), Rule("blocks.1.qkv", r=1, alpha=2, enable_lora=[True, False, True])],
}


def _adapters(dtype=torch.float32, names=("a", "b", "c")):
    torch.manual_seed(0)
    model = TinyTransformer().to(dtype)
    gm = fxlora.rewrite(model, RULES[names[0]], adapter=names[0])
    for name in names[1:]:
        fxlora.add_adapter(gm, RULES[name], name)
    randomize_lora(gm, std=0.3)
    return model, gm


def _alone(gm, x):
    """Each adapter (and None, the base) applied to the whole batch, one at a time."""
    out = {}
    for name in [*fxlora.adapters(gm), None]:
        fxlora.set_adapter(gm, name)
        out[name] = gm(x).detach()
    return out


# rows per sample on either side of the switch between the dense form (few rows: every adapter in one
# GEMM, masked) and the gather form (each sample's factors gathered); 3 adapters + the base slot
DENSE, GATHER = fxlora.lora.DENSE_ROWS // 4, fxlora.lora.DENSE_ROWS // 4 + 1


@pytest.mark.parametrize("length", [1, DENSE, GATHER])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_each_sample_gets_its_own_adapter(dtype, tol, length):
    model, gm = _adapters(dtype)
    x = torch.randint(0, 40, (6, length))
    alone = _alone(gm, x)
    server = fxlora.serve(gm)
    ids = torch.tensor([2, 0, -1, 1, 1, 0])
    names = fxlora.adapters(gm)
    out = server(x, ids)
    for i, slot in enumerate(ids.tolist()):
        expected = alone[None if slot < 0 else names[slot]][i]
        torch.testing.assert_close(out[i], expected, atol=tol, rtol=tol)
    assert torch.equal(server(x, torch.full((6,), -1))[2], model(x)[2])  # the base slot is the base, exactly
    assert out.dtype == dtype
    with torch.no_grad():  # inference adds the branches into the sites' outputs in place
        torch.testing.assert_close(server(x, ids), out, atol=tol, rtol=tol)


class _Flat(torch.nn.Module):
    """Sites whose activations are 2-D (samples x rows flattened), as GPT-2's Conv1D computes them."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 12)
        self.fc1, self.fc2 = torch.nn.Linear(12, 20), torch.nn.Linear(20, 12)

    def forward(self, x):
        b, s = x.shape
        h = self.emb(x).view(b * s, 12)
        return self.fc2(torch.relu(self.fc1(h))).view(b, s, 12)


@pytest.mark.parametrize("length", [1, fxlora.lora.DENSE_ROWS // 3 + 1])  # dense, gather (2 adapters + base)
@pytest.mark.parametrize("grad", [False, True])
def test_flattened_2d_activations_in_and_out_of_place(length, grad):
    torch.manual_seed(0)
    rules = {"a": [Rule("fc1", r=2, alpha=4), Rule("fc2", r=3, alpha=3)], "b": [Rule("fc*", r=4, alpha=2)]}
    gm = fxlora.rewrite(_Flat(), rules["a"], adapter="a")
    fxlora.add_adapter(gm, rules["b"], "b")
    randomize_lora(gm, std=0.3)
    x = torch.randint(0, 40, (5, length))
    alone = _alone(gm, x)
    ids = torch.tensor([1, -1, 0, 0, 1])
    with torch.set_grad_enabled(grad):
        out = fxlora.serve(gm)(x, ids)
    for i, name in enumerate(["b", None, "a", "a", "b"]):
        torch.testing.assert_close(out[i], alone[name][i], atol=1e-5, rtol=1e-5)
    assert out.requires_grad == grad


def test_one_graph_whatever_the_ids_no_loop_over_adapters_no_retrace(monkeypatch):
    _, gm = _adapters()
    server = fxlora.serve(gm)
    fxlora.add_adapter(gm, RULES["a"], "d")  # a fourth adapter on sites the others already have
    assert len(fxlora.serve(gm).graph.nodes) == len(server.graph.nodes)  # the graph does not grow with N
    monkeypatch.setattr("fxlora.tracing.trace", lambda *a, **k: pytest.fail("re-traced"))
    code = server.code
    x = torch.randint(0, 40, (4, 5))
    for ids in ([0, 1, 2, -1], [2, 2, 2, 2], [-1, 0, -1, 0]):
        server(x, torch.tensor(ids))
    assert server.code == code


@pytest.mark.parametrize("length", [DENSE, GATHER])
def test_mixed_batch_training_gives_each_adapter_its_own_gradients(length):
    _, gm = _adapters()
    x = torch.randint(0, 40, (6, length))
    ids = torch.tensor([0, 1, 2, 1, 0, 2])
    names = fxlora.adapters(gm)
    server = fxlora.serve(gm)
    server(x, ids).square().mean(-1).sum().backward()  # a loss summed over samples
    served_sites = fxlora.provenance.adapter_state(server)["served"]["sites"]
    for slot, name in enumerate(names):
        fxlora.set_adapter(gm, name)
        gm.zero_grad()
        own = ids == slot
        gm(x[own]).square().mean(-1).sum().backward()
        for site, spec in fxlora.graph_sites(gm, name).items():
            layout = served_sites[site]
            gA, gB = gm.get_parameter(spec.lora_A).grad, gm.get_parameter(spec.lora_B).grad
            stack_A = server.get_parameter(layout.A).grad[slot]
            stack_B = server.get_parameter(layout.B).grad[slot]
            R, o = layout.rank, layout.rows
            for g, block in enumerate(layout.block_of[name]):
                torch.testing.assert_close(stack_A[block * R : block * R + spec.r], gA[g * spec.r : (g + 1) * spec.r],
                                           atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(stack_B[block * o : (block + 1) * o, : spec.r], gB[g * o : (g + 1) * o],
                                           atol=1e-5, rtol=1e-4)
    for layout in served_sites.values():  # padding rows and the base slot get no gradient
        assert torch.count_nonzero(server.get_parameter(layout.A).grad[-1]) == 0


def test_new_weights_in_a_slot_cause_no_recompilation():
    _, gm = _adapters()
    server = fxlora.serve(gm).eval()
    compiled = torch.compile(server, backend="eager", dynamic=False)
    x = torch.randint(0, 40, (4, 5))
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        first = compiled(x, torch.tensor([0, 1, 2, -1]))
        compiled(x, torch.tensor([2, 2, 0, 1]))  # other ids
        layout = next(iter(fxlora.provenance.adapter_state(server)["served"]["sites"].values()))
        server.get_parameter(layout.B)[0].add_(1.0)  # new weights in adapter 0's slot, in place
        second = compiled(x, torch.tensor([0, 1, 2, -1]))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, server(x, torch.tensor([0, 1, 2, -1])))


def test_bad_adapter_ids_are_refused():
    _, gm = _adapters()
    server = fxlora.serve(gm)
    x = torch.randint(0, 40, (4, 5))
    with pytest.raises(fxlora.ArgumentError, match=r"holds -2..1, but this module serves 3 adapters"):
        server(x, torch.tensor([0, 1, -2, 0]))
    with pytest.raises(fxlora.ArgumentError, match="holds 0..3"):
        server(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(fxlora.ArgumentError, match="1-D int64 or int32 tensor"):
        server(x, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(fxlora.ArgumentError, match="adapter_ids has 3 entries, but the input of site"):
        server(x, torch.tensor([0, 1, 2]))
    with pytest.raises(fxlora.ArgumentError, match="no adapter named 'z'"):
        fxlora.serve(gm, ["a", "z"])
    with pytest.raises(fxlora.ArgumentError, match="already serves"):
        fxlora.serve(server)


def _counting_id_reads(monkeypatch):
    """A served module, an input, and the list that grows by one each time the ids are read on the host."""
    _, gm = _adapters()
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or aminmax(t))
    return fxlora.serve(gm), torch.randint(0, 40, (4, 5)), reads


def test_cpu_ids_are_read_on_every_call(monkeypatch):
    server, x, reads = _counting_id_reads(monkeypatch)
    ids = torch.tensor([0, 1, 2, -1])
    for _ in range(3):
        server(x, ids)
    assert len(reads) == 3
    ids.data[2] = -2  # no version bump: still refused, because CPU ids are read every time
    with pytest.raises(fxlora.ArgumentError, match="holds -2..1"):
        server(x, ids)


def test_device_ids_are_read_once_per_unchanged_tensor_and_asserted_on_the_device_after(monkeypatch):
    """On a GPU reading the ids waits for the device: the same tensor, passed again unchanged (a generation
    loop), is read once; changed in place (its version counter), a new tensor, or an inference tensor
    (no version counter) is read, and refused, again; a write that bypasses the version counter fails the
    device-side assert.  Run here on CPU with CPU tensors treated as device tensors."""
    from fxlora.passes import serve_pass

    monkeypatch.setattr(serve_pass, "READ_EVERY_CALL", frozenset())
    server, x, reads = _counting_id_reads(monkeypatch)
    ids = torch.tensor([0, 1, 2, -1])
    first = server(x, ids)
    for _ in range(3):
        torch.testing.assert_close(server(x, ids), first)
    assert len(reads) == 1
    ids[2] = 3
    with pytest.raises(fxlora.ArgumentError, match="holds -1..3"):
        server(x, ids)
    with pytest.raises(fxlora.ArgumentError, match="holds -1..3"):
        server(x, ids)
    with pytest.raises(fxlora.ArgumentError, match="holds 0..3"):
        server(x, torch.tensor([0, 1, 3, 0]))
    with torch.inference_mode():
        frozen = torch.tensor([0, 1, 2, -1])
        server(x, frozen), server(x, frozen)
    assert len(reads) == 3 + 3
    ids = torch.tensor([0, 1, 2, -1])
    server(x, ids)
    ids.data[2] = -2  # bypasses the version counter: caught on the device, not served as adapter 1
    with pytest.raises(RuntimeError, match="adapter_ids out of range"):
        server(x, ids)


def test_a_module_sites_output_that_its_hooks_keep_is_never_written():
    """Inference adds each branch in place only into a linear function's fresh result: a module's output
    may be kept by its forward hooks (recorded, or patched in from a stored activation)."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = M()
    gm = fxlora.rewrite(model, [Rule("fc", r=2, alpha=4)], adapter="a")
    fxlora.add_adapter(gm, [Rule("fc", r=2, alpha=4)], "b")
    randomize_lora(gm, std=0.3)
    server = fxlora.serve(gm).eval()
    x, ids = torch.randn(3, 5, 8), torch.tensor([0, 1, -1])
    base_out = torch.nn.functional.linear(x, model.fc.weight, model.fc.bias)
    seen = []
    hook = server.fc.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        expected = server(x, ids)
    hook.remove()
    assert torch.equal(seen[0], base_out)
    stored = base_out.clone()
    server.fc.register_forward_hook(lambda m, i, o: stored)
    with torch.no_grad():
        runs = [server(x, ids) for _ in range(3)]
    assert torch.equal(stored, base_out)
    for run in runs:
        torch.testing.assert_close(run, expected)


def test_jit_trace_which_would_drop_the_id_check_is_refused():
    _, gm = _adapters()
    server = fxlora.serve(gm).eval()
    x = torch.randint(0, 40, (4, 5))
    with pytest.raises(fxlora.ArgumentError, match="torch.jit.trace cannot keep a served module's adapter_ids check"):
        torch.jit.trace(server, (x, torch.tensor([0, 1, 2, -1])), check_trace=False)


def test_autocast_mixed_dtypes_serve_as_the_alone_branch_does():
    _, gm = _adapters()
    x = torch.randint(0, 40, (3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        alone = _alone(gm, x)
        out = fxlora.serve(gm)(x, torch.tensor([1, -1, 0]))
    names = fxlora.adapters(gm)
    for i, name in enumerate([names[1], None, names[0]]):
        torch.testing.assert_close(out[i].float(), alone[name][i].float(), atol=3e-2, rtol=3e-2)


def test_a_hugging_face_decoder_captured_with_torch_export():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (4, 8))
    kw = {"use_cache": False}
    gm = fxlora.rewrite(model, [Rule("model.layers.*.self_attn.[qv]_proj", r=4, alpha=8)], adapter="a",
                        example_inputs=(ids,), example_kwargs=kw)
    fxlora.add_adapter(gm, [Rule("model.layers.*.mlp.*_proj", r=2, alpha=4), Rule("model.layers.0.self_attn.q_proj", r=8, alpha=8)], "b")
    randomize_lora(gm, std=0.2)
    alone = {}
    for name in ("a", "b", None):
        fxlora.set_adapter(gm, name)
        alone[name] = gm(ids, **kw).logits.detach()
    assert not torch.allclose(alone["a"], alone[None]) and not torch.allclose(alone["b"], alone[None])
    server = fxlora.serve(gm)
    out = server(ids, adapter_ids=torch.tensor([0, 1, -1, 1]), **kw).logits
    for i, name in enumerate(("a", "b", None, "b")):
        torch.testing.assert_close(out[i], alone[name][i], atol=1e-5, rtol=1e-5)
    assert server(torch.randint(0, 100, (3, 5)), adapter_ids=torch.tensor([0, 1, -1]), **kw).logits.shape == (3, 5, 100)


def test_a_checkpoint_loads_into_an_adapters_slot_without_recompiling(tmp_path):
    model, gm = _adapters()
    x = torch.randint(0, 40, (4, 5))
    fxlora.save_lora(gm, tmp_path / "b.safetensors", adapter="b")
    server = fxlora.serve(gm).eval()
    assert all(torch.equal(v, fxlora.lora_state_dict(gm, adapter="b")[k])
               for k, v in fxlora.lora_state_dict(server, adapter="b").items())
    retrained = fxlora.rewrite(model, RULES["b"])  # another b, trained elsewhere
    randomize_lora(retrained, seed=5)
    fxlora.save_lora(retrained, tmp_path / "b_new.safetensors")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(server, backend="eager")
    ids = torch.tensor([1, 0, 1, -1])
    with torch.no_grad():
        compiled(x, ids)
        fxlora.load_lora(server, tmp_path / "b_new.safetensors", adapter="b")
        out = compiled(x, ids)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out[0], retrained(x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], fxlora.set_adapter(gm, "a") or gm(x)[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(fxlora.CheckpointError, match="missing LoRA keys: blocks.1.qkv.lora_A"):
        fxlora.load_lora(server, tmp_path / "b.safetensors", adapter="c")  # another adapter's checkpoint


def test_switching_folding_or_reporting_a_served_module_is_refused_unchanged():
    _, gm = _adapters()
    server = fxlora.serve(gm)
    code, nodes = server.code, len(server.graph.nodes)
    calls = {
        "set_adapter": lambda: fxlora.set_adapter(server, "a"),
        "add_adapter": lambda: fxlora.add_adapter(server, RULES["a"], "d"),
        "delete_adapter": lambda: fxlora.delete_adapter(server, "a"),
        "unload": lambda: fxlora.unload(server),
        "fold": lambda: fxlora.fold(server),
        "combine_adapters": lambda: fxlora.combine_adapters(server, {"a": 1.0, "b": 1.0}, "ab"),
        "report": lambda: fxlora.report(server),
    }
    for what, call in calls.items():
        with pytest.raises(fxlora.ArgumentError, match=f"{what} does not work on a served module"):
            call()
    assert server.code == code and len(server.graph.nodes) == nodes and fxlora.adapters(server) == ["a", "b", "c"]
    with pytest.raises(fxlora.ArgumentError, match="no adapter named 'zz'"):
        fxlora.lora_parameter_names(server, adapter="zz")
    assert set(fxlora.lora_parameter_names(server, adapter="c")) < set(fxlora.lora_parameter_names(server))


def test_serving_adapters_with_dropout_warns_that_it_applies_none():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("head", r=2, alpha=2, dropout=0.5)], adapter="a")
    fxlora.add_adapter(gm, [Rule("head", r=2, alpha=2)], "b")
    with pytest.warns(UserWarning, match="adapter\\(s\\) 'a' use LoRA dropout, which a served module does not apply"):
        server = fxlora.serve(gm).train()
    x = torch.randint(0, 40, (2, 5))
    assert torch.equal(server(x, torch.tensor([0, 1])), server(x, torch.tensor([0, 1])))  # no dropout, as it says


def test_out_of_range_ids_are_not_served_as_the_base_under_compile():
    _, gm = _adapters()
    server = fxlora.serve(gm).eval()
    compiled = torch.compile(server, backend="eager", dynamic=False)
    x = torch.randint(0, 40, (4, 5))
    with torch.no_grad():
        compiled(x, torch.tensor([0, 1, 2, -1]))
        for bad in ([0, 1, -7, 0], [0, 1, 3, 0]):
            with pytest.raises(RuntimeError, match="adapter_ids out of range"):
                compiled(x, torch.tensor(bad))
