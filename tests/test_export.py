"""Export of folded models: the artifacts are verified, and carry no extra operator."""

from __future__ import annotations

import fxlora
import pytest
import torch
from fxlora import export
from fxlora.export import ExportError
from torch import nn

from helpers import ConvNet, TinyTransformer, randomize_lora


class LinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, idx):
        return self.out(self.emb(idx).mean(1))


CASES = {
    "linear": (LinearModel, lambda: torch.randn(4, 16), [fxlora.Rule("fc*", r=4, alpha=8)]),
    "fused_qkv_transformer": (
        TinyTransformer,
        lambda: torch.randint(0, 40, (2, 7)),
        [fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]), fxlora.Rule("head", r=2, alpha=2)],
    ),
    "embedding": (EmbeddingModel, lambda: torch.randint(0, 50, (3, 5)), [fxlora.Rule("emb", r=4, alpha=4)]),
    "convnet": (ConvNet, lambda: torch.randn(2, 3, 12, 12), [fxlora.Rule("c*", r=2, alpha=4)]),
}


def _folded(case):
    factory, inputs, rules = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    gm = fxlora.rewrite(model, rules)
    randomize_lora(gm)
    return model, fxlora.fold(gm).eval(), gm.eval(), (inputs(),)


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_of_folded_model_has_the_base_operator_count(case, tmp_path):
    model, folded, gm, x = _folded(case)
    export.to_onnx(folded, x, tmp_path / "folded.onnx")
    export.to_onnx(torch.fx.symbolic_trace(model), x, tmp_path / "base.onnx")
    folded_ops = export.onnx_op_counts(tmp_path / "folded.onnx")
    base_ops = export.onnx_op_counts(tmp_path / "base.onnx")
    assert folded_ops == base_ops and sum(folded_ops.values()) > 0
    with pytest.raises(ExportError, match="still has LoRA branches"):
        export.to_onnx(gm, x, tmp_path / "unmerged.onnx")


@pytest.mark.parametrize("case", sorted(CASES))
def test_torchscript_and_exported_program_are_verified(case, tmp_path):
    _, folded, gm, x = _folded(case)
    ts = export.to_torchscript(folded, x, tmp_path / "m.pt")
    torch.testing.assert_close(ts.artifact(*x), gm(*x), atol=1e-5, rtol=1e-5)
    ep = export.to_exported_program(folded, x, tmp_path / "m.pt2")
    torch.testing.assert_close(ep.artifact.module()(*x), gm(*x), atol=1e-5, rtol=1e-5)
    assert ts.path == tmp_path / "m.pt" and ep.path == tmp_path / "m.pt2" and ts.max_abs_diff <= 1e-5
    assert (tmp_path / "m.pt").exists() and (tmp_path / "m.pt2").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_unmerged_onnx_graph_is_larger(tmp_path):
    """What folding saves, measured on the artifact: the unmerged graph has extra MatMul/Add nodes."""
    _, folded, gm, x = _folded("linear")
    program = torch.onnx.export(gm, x, dynamo=True)
    program.save(str(tmp_path / "unmerged.onnx"))
    unmerged = sum(export.onnx_op_counts(tmp_path / "unmerged.onnx").values())
    export.to_onnx(folded, x, tmp_path / "folded.onnx")
    merged = sum(export.onnx_op_counts(tmp_path / "folded.onnx").values())
    assert unmerged > merged


def test_mismatch_reports_the_largest_difference():
    a = torch.zeros(3)
    b = torch.tensor([0.0, 0.5, 0.25])
    with pytest.raises(ExportError, match="differs from the folded module by up to 0.5"):
        export.compare(a, [b], "artifact")
    with pytest.raises(ExportError, match="returns 2 tensors, the folded module 1"):
        export.compare(a, [a, a], "artifact")
    assert export.compare((a, b), [a, b], "artifact") == 0.0


def test_export_refuses_a_non_module_and_the_old_argument_order(tmp_path):
    with pytest.raises(ExportError, match="expects an nn.Module"):
        export.to_torchscript("model", None, tmp_path / "x.pt")
    _, folded, _, x = _folded("linear")
    with pytest.raises(ExportError, match=r"takes \(module, example_inputs, path\)"):
        export.to_torchscript(folded, tmp_path / "x.pt", x)
    assert not (tmp_path / "x.pt").exists()


class Structured(nn.Module):
    """Keyword inputs, a non-tensor argument and a dict output holding a tuple."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale: float = 1.0):
        y = self.fc(x) * scale
        if mask is not None:
            y = y * mask
        return {"y": y, "pair": (y.sum(-1), y.mean())}


EXPORTERS = {
    "onnx": (export.to_onnx, "m.onnx"),
    "exported_program": (export.to_exported_program, "m.pt2"),
    "torchscript": (export.to_torchscript, "m.pt"),
}


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_exporters_take_keyword_inputs_and_structured_outputs(exporter, tmp_path):
    fn, filename = EXPORTERS[exporter]
    torch.manual_seed(0)
    model = Structured()
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, 4)
    gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=2, alpha=2)])
    randomize_lora(gm)
    folded = fxlora.fold(gm).eval()
    out = fn(folded, (x,), tmp_path / filename, example_kwargs={"mask": mask, "scale": 2.0})
    assert out.max_abs_diff <= 1e-5 and out.path.exists()
    if exporter == "onnx":
        assert out.output_names == ("y", "pair.0", "pair.1") and out.input_names == ("x", "mask")
    if exporter == "torchscript":  # traced flat: the call's tensors in, the output's tensors out
        assert out.input_names == ("x", "mask") and out.output_names == ("y", "pair.0", "pair.1")
        torch.testing.assert_close(out.artifact(x, mask)[0], folded(x, mask=mask, scale=2.0)["y"])


class Drifts(nn.Module):
    """Counts its calls in a Python attribute: every artifact bakes in another count than the first call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + self.calls


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_every_exporter_failure_is_an_export_error_and_leaves_no_file(exporter, tmp_path):
    fn, filename = EXPORTERS[exporter]
    _, folded, _, x = _folded("linear")
    path = tmp_path / filename
    with pytest.raises(ExportError, match="running the module on the example inputs failed"):
        fn(folded, (*x, *x, *x), path)  # inputs that do not fit the module
    with pytest.raises(ExportError, match="example_kwargs must be a dict"):
        fn(folded, x, path, example_kwargs=[("x", x)])
    with pytest.raises(ExportError, match="atol and rtol"):
        fn(folded, x, path, atol=-1.0)
    with pytest.raises(ExportError, match="differs from the folded module"):
        fn(Drifts(), (torch.randn(2, 4),), path)  # an artifact that does not reproduce the module
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary left
    path.write_bytes(b"previous artifact")
    with pytest.raises(ExportError, match="differs from the folded module"):
        fn(Drifts(), (torch.randn(2, 4),), path)
    assert path.read_bytes() == b"previous artifact"  # a failed export leaves the path as it was
    with pytest.raises(ExportError, match="folder .* does not exist"):
        fn(folded, x, tmp_path / "missing" / filename)


def test_a_graph_torch_export_cannot_capture_is_an_export_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() if x.sum() > 0 else x.sum() * 0  # data-dependent control flow

    with pytest.raises(ExportError, match="to_exported_program failed"):
        export.to_exported_program(DataDependent(), (torch.randn(4),), tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())
