"""On a GPU: rewrite, train, fold and merge_on_eval with CUDA tensors, fp32 and bf16.

These run where CUDA is available (the project's GPU runs); on a CPU-only machine they are skipped,
and the same behaviour is covered on CPU by the rest of the suite.
"""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RULES = [Rule("transformer.h.*.attn.c_attn", r=8, alpha=16, enable_lora=[True, False, True]),
         Rule("transformer.h.*.mlp.c_fc", r=8, alpha=16, dropout=0.1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewrite_train_fold_on_cuda(dtype):
    torch.manual_seed(0)
    model = zoo.gpt2_tiny().to("cuda", dtype).eval()
    gm = fxlora.rewrite(model, RULES)
    assert all(gm.get_parameter(n).device.type == "cuda" for n in fxlora.lora_parameter_names(gm))
    x = torch.randint(0, 256, (8, 32), device="cuda")
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
    gm.train()
    first = None
    for _ in range(30):
        loss = F.cross_entropy(gm(x)[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
    gm.eval()
    folded = fxlora.fold(gm)
    with torch.no_grad():
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(folded(x).float(), gm(x).float(), atol=tol, rtol=tol)
    for name, spec in fxlora.graph_sites(gm).items():
        W, A, B = (gm.get_parameter(n) for n in (spec.weight, spec.lora_A, spec.lora_B))
        assert folded.get_parameter(spec.weight).device.type == "cuda"
        expected = fxlora.lora.merged_weight(W.cpu(), [(A.cpu(), B.cpu(), spec, 1.0)])
        torch.testing.assert_close(folded.get_parameter(spec.weight).cpu(), expected, atol=1e-6, rtol=0)


def test_merge_on_eval_on_cuda():
    torch.manual_seed(0)
    gm = fxlora.rewrite(zoo.gpt2_tiny().cuda(), RULES, merge_on_eval=True)
    with torch.no_grad():
        for n in fxlora.lora_parameter_names(gm):
            gm.get_parameter(n).normal_(0, 0.02)
    x = torch.randint(0, 256, (4, 16), device="cuda")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    for _ in range(50):
        gm.eval()
        out = gm(x)
        gm.train()
    assert torch.equal(out, fxlora.fold(gm).eval()(x))
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def _served_gpt2_tiny():
    """A CUDA GPT-2 with adapters "a" (RULES) and "b" (r=4 on mlp.c_proj), non-zero, and its server."""
    torch.manual_seed(0)
    model = zoo.gpt2_tiny().to("cuda").eval()
    gm = fxlora.rewrite(model, RULES, adapter="a")
    fxlora.add_adapter(gm, [Rule("transformer.h.*.mlp.c_proj", r=4, alpha=4)], "b")
    for name in fxlora.lora_parameter_names(gm):
        torch.nn.init.normal_(gm.get_parameter(name), std=0.2)
    gm.eval()
    server = fxlora.serve(gm).eval()
    return gm, server


@pytest.mark.parametrize("rows", [1, 40])  # the dense form (decoding) and the one each device picks for prompts
def test_serving_on_cuda_reads_the_ids_once_and_asserts_on_the_device(monkeypatch, rows):
    gm, server = _served_gpt2_tiny()
    x = torch.randint(0, 256, (4, rows), device="cuda")
    ids = torch.tensor([1, -1, 0, 1], device="cuda")
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or aminmax(t))
    with torch.no_grad():
        out = server(x, ids)
        for _ in range(3):
            torch.testing.assert_close(server(x, ids), out)
        assert len(reads) == 1
        for i, name in enumerate(["b", None, "a", "b"]):
            fxlora.set_adapter(gm, name)
            torch.testing.assert_close(out[i], gm(x)[i], atol=1e-4, rtol=1e-4)
        ids[1] = 2
        with pytest.raises(fxlora.ArgumentError, match="holds 0..2"):
            server(x, ids)


def test_a_served_module_captured_in_a_cuda_graph_replays_each_samples_adapter():
    """Serving engines replay CUDA graphs; a captured served forward checks the ids on the device (no host
    read while capturing) and follows new ids written into its input buffer."""
    gm, server = _served_gpt2_tiny()
    x = torch.randint(0, 256, (4, 16), device="cuda")
    ids = torch.tensor([1, -1, 0, 1], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        fresh = torch.tensor([0, 1, 0, -1], device="cuda")  # never read on the host before the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            server(x, ids)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = server(x, fresh)
        for new in ([1, -1, 0, 1], [0, 0, -1, 1]):
            fresh.copy_(torch.tensor(new, device="cuda"))
            graph.replay()
            torch.testing.assert_close(out, server(x, torch.tensor(new, device="cuda")))
            for i, slot in enumerate(new):
                fxlora.set_adapter(gm, None if slot < 0 else ["a", "b"][slot])
                torch.testing.assert_close(out[i], gm(x)[i], atol=1e-4, rtol=1e-4)
