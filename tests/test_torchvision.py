"""torchvision's own resnet18 through symbolic trace (where torchvision is installed: the CPU build of
torch used in CI has no matching torchvision, so there the architecture-identical ``fxlora.zoo.resnet18``
carries the same tests, see test_hf.py), and a check that the zoo model is torchvision's."""

from __future__ import annotations

import fxlora
import pytest
import torch
from fxlora import Rule, zoo

torchvision = pytest.importorskip("torchvision")


def test_zoo_resnet18_is_torchvision_resnet18():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    ours = zoo.resnet18(num_classes=10).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_torchvision_resnet18_rewrite_and_fold():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = fxlora.rewrite(model, [Rule("layer*.*.conv*", r=4, alpha=8), Rule("fc", r=2, alpha=2)])
    assert len(fxlora.graph_sites(gm)) == 17
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        for n in fxlora.lora_parameter_names(gm):
            gm.get_parameter(n).normal_(0, 0.05)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(x), gm(x), atol=1e-4, rtol=1e-4)
    base = torch.fx.symbolic_trace(model)
    assert [(n.op, n.target) for n in folded.graph.nodes] == [(n.op, n.target) for n in base.graph.nodes]
    model.load_state_dict(folded.state_dict(), strict=True)
