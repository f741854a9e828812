"""fxlora.calling: a model captured with torch.export is called like the original model, and so are
the rewritten and folded modules made from it."""

from __future__ import annotations

import copy
import inspect

import fxlora
import pytest
import torch
from fxlora import ArgumentError, Rule
from fxlora.calling import convention
from torch import nn

from helpers import randomize_lora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, mask=None, scale: float = 1.0, flag=False, *, extra=None):
        y = self.fc(x) * scale
        if mask is not None:
            y = y * mask
        if flag:
            y = y + 1
        return {"y": self.out(y), "z": y.sum(-1)}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, generator=g), (torch.rand(2, 3, 1, generator=g) > 0.3).float()


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    model = Net().eval()
    x, mask = _inputs()
    gm = fxlora.rewrite(model, [Rule("fc", r=2, alpha=2)], example_inputs=(x,), example_kwargs={"mask": mask, "flag": True})
    randomize_lora(gm)
    return model, gm.eval(), x, mask


def _assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_called_positionally_or_by_keyword_with_captured_constants_as_defaults(captured):
    model, gm, x, mask = captured
    assert gm.meta["fxlora_capture"] == "torch.export"
    folded = fxlora.fold(gm)
    with torch.no_grad():
        expected = gm(x, mask=mask)
        for module in (gm, folded, copy.deepcopy(gm)):
            _assert_same(module(x, mask), expected)
            _assert_same(module(x=x, mask=mask), expected)
            _assert_same(module(x, mask=mask, flag=True, scale=1.0, extra=None), expected)  # captured / default values
        ref = copy.deepcopy(model)
        ref.fc.weight += gm.get_parameter("fc.lora_B") @ gm.get_parameter("fc.lora_A")
        _assert_same(folded(x, mask), ref(x, mask=mask, flag=True))
    params = inspect.signature(folded.forward).parameters
    assert list(params) == ["x", "mask", "scale", "flag", "extra"]
    assert params["flag"].default is True and params["scale"].default == 1.0 and params["extra"].default is None
    assert params["mask"].default is None  # required: leaving it out names it (below)
    assert params["extra"].kind is inspect.Parameter.KEYWORD_ONLY
    assert convention(folded)["inputs"] == ("x", "mask")


def test_a_missing_input_another_constant_or_an_uncaptured_input_is_an_error_naming_it(captured):
    _, gm, x, mask = captured
    folded = fxlora.fold(gm)
    for module in (gm, folded):
        with pytest.raises(ArgumentError, match="captured with mask=<tensor>"):
            module(x)
        with pytest.raises(ArgumentError, match=r"flag=False differs from the value Net was captured with \(flag=True\)"):
            module(x, mask, flag=False)
        with pytest.raises(ArgumentError, match=r"scale=2.0 differs from its default \(1.0\)"):  # the graph used the default
            module(x, mask, scale=2.0)
        with pytest.raises(ArgumentError, match="extra was not given when Net was captured"):
            module(x, mask, extra=torch.ones(1))
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):  # not a parameter at all
            module(x, mask, bogus=1)


def test_var_keyword_inputs_given_at_capture():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, **kwargs):
            return self.fc(x) * kwargs.get("temperature", 1.0) + kwargs["bias"]

    model = KW()
    x, b = torch.randn(2, 4), torch.randn(4)
    gm = fxlora.rewrite(
        model, [Rule("fc", r=1, alpha=1)], example_inputs=(x,), example_kwargs={"temperature": 2.0, "bias": b}, capture="export"
    )
    assert "kwargs" in inspect.signature(gm.forward).parameters
    with torch.no_grad():
        torch.testing.assert_close(gm(x, bias=b), model(x, temperature=2.0, bias=b))
    with pytest.raises(ArgumentError, match="temperature=3.0 differs"):
        gm(x, bias=b, temperature=3.0)
    with pytest.raises(ArgumentError, match="other was not given"):
        gm(x, bias=b, other=1)
    with pytest.raises(ArgumentError, match="captured with bias=<tensor>"):
        gm(x)


def test_symbolic_captures_keep_their_own_signature():
    model = Net()
    gm = fxlora.rewrite(model, [Rule("fc", r=1, alpha=1)], capture="symbolic", concrete_args={"flag": False, "mask": None})
    assert convention(gm) is None
    x, _ = _inputs()
    torch.testing.assert_close(gm(x)["y"], model(x)["y"])


def test_torch_fx_can_retrace_the_generated_code():
    """torch.fx re-traces a graph module's code (torch.fx.symbolic_trace(gm), and when it unpickles one):
    the convention's checks step aside for proxies and the structure stays."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None, flag=False):
            return self.fc(x) * mask + (1 if flag else 0)

    model = Plain()
    x, mask = torch.randn(2, 4), torch.rand(2, 4)
    gm = fxlora.capture(model, example_inputs=(x,), example_kwargs={"mask": mask, "flag": True}, capture="export")
    retraced = torch.fx.symbolic_trace(gm)
    with torch.no_grad():
        torch.testing.assert_close(retraced(x, mask), model(x, mask, True))


def test_an_input_captured_as_none_is_a_constant_and_the_message_stays_short():
    model = Net()
    x, mask = _inputs()
    gm = fxlora.capture(model, example_inputs=(x,), example_kwargs={"mask": None}, capture="export")
    with torch.no_grad():
        torch.testing.assert_close(gm(x)["y"], model(x)["y"])
    with pytest.raises(ArgumentError) as info:
        gm(x, mask=mask)
    assert "mask=<tensor (2, 3, 1) float32> differs from the value Net was captured with (mask=None)" in str(info.value)
    assert len(str(info.value)) < 400


def test_an_example_input_that_is_a_view_does_not_tie_the_graph_to_its_base():
    # torch.export guards the base of a view input (ids[:, :8]): fxlora captures from a copy, so the graph
    # takes any length, views or not
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8)).eval()
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    gm = fxlora.rewrite(model, [Rule("1", r=2, alpha=2)], example_inputs=(ids[:, :8],), capture="export")
    randomize_lora(gm)
    folded = fxlora.fold(gm.eval())
    for x in (ids[:, :8], ids[:, :16], ids, torch.randint(0, 50, (3, 100))):
        torch.testing.assert_close(gm(x), folded(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(gm(ids), model(ids))  # the adapter is live


def test_a_keyword_taken_through_var_keyword_but_not_captured_is_named():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, **kwargs):
            return self.fc(x) * (2.0 if kwargs.get("double") else 1.0)

    x = torch.randn(2, 4)
    gm = fxlora.rewrite(Kw(), [fxlora.Rule("fc", r=2, alpha=2)], capture="export", example_inputs=(x,))
    torch.testing.assert_close(gm(x=x), gm(x))
    with pytest.raises(fxlora.ArgumentError, match="double was not given when Kw was captured.*example_kwargs"):
        gm(x, double=True)
