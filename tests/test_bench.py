"""The side-by-side benchmarks run end to end in their --small mode (CPU, tiny models), so that the GPU
runs they are made for do not fail on a bug: every row is measured, every check passes, results files
are written."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from fxlora.tools import bench, bench_fsdp, bench_scale, bench_serve  # noqa: E402
from fxlora.tools.benchkit import build_model  # noqa: E402


def test_bench_serve_small(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--small", "--layers", "1", "--models", "llama-1.2b", "--repeats", "1", "--new-tokens", "2",
            "--lower-branches", "on", "--out", str(out)]  # the single rows lowered: checked against the served ones
    assert bench_serve.main(argv) == 0
    data = json.loads(out.read_text())
    assert not data["errors"] and not data["partial"]
    (res,) = data["models"]
    checks = res["checks"]
    assert checks["ok"] and checks["decode_ok"]
    assert checks["served_vs_alone"] <= checks["tolerance"] and checks["peft_mixed_vs_served"] <= checks["tolerance"]
    assert checks["adapter_effect"] > 0.05  # the adapters do change the output
    graphed = {f"{row}, CUDA graph" for row in bench_serve.GRAPHED}  # replayed CUDA graphs: on CUDA only
    assert set(res["prefill_ms"]) == set(bench_serve.PREFILL_ROWS) - graphed
    assert set(res["decode_ms_per_token"]) == set(bench_serve.DECODE_ROWS)
    prefill = dict(res["prefill_ratios"])
    assert prefill.pop("fxlora mixed / fxlora single, CUDA graphs") is None
    assert all(v is not None for v in [*prefill.values(), *res["decode_ratios"].values()])
    stored = res["adapter_bytes"]
    assert stored["PEFT"] == stored["adapters' own factors"]  # each adapter once, in the model's dtype
    # stacked: one zero slot for the base beside 4 adapters, and a scale per rank row
    assert stored["adapters' own factors"] < stored["fxlora served"] < 1.3 * stored["adapters' own factors"]
    assert "| fxlora mixed |" in data["markdown"]


def test_bench_small(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["--small", "--layers", "1", "--repeats", "1", "--fold-repeats", "1", "--compile-impls", "fxlora",
            "--lowered", "on", "--out", str(out), "--plot", str(png)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert not data["errors"] and not data["partial"]
    impls = ["PEFT", "fxlora"] + (["loralib"] if importlib.util.find_spec("loralib") else [])
    assert [m["model"] for m in data["models"]] == ["gpt2-medium", "llama-1.2b"]
    for res in data["models"]:
        for name in ["base", *impls]:
            assert res["checks"][name]["ok"], (res["model"], name, res["checks"][name])
        for name in impls:
            assert res["checks"][name]["grads"] <= res["checks"]["tolerance"]["grads"]
            assert res["checks"][name]["folded_logits"] <= res["checks"]["tolerance"]["outputs"]
        assert set(res["fold_ms"]) == set(impls)
        # the eager lowering's row: checked against the float32 reference like the others (it has no fold of its own)
        assert res["checks"]["fxlora lowered"]["ok"], res["checks"]["fxlora lowered"]
        assert res["checks"]["fxlora lowered"]["grads"] <= res["checks"]["tolerance"]["grads"]
        assert sum(res["checks"]["fxlora lowered"]["lowered_calls"].values()) > 0  # it did run lowered
        # the floor: the base's outputs, timed as a train step only
        assert res["checks"][bench.FLOOR]["ok"] and "grads" not in res["checks"][bench.FLOOR]
        # sibling branches share a shrink in the row "fxlora siblings": Llama's q, k, v and gate, up; GPT-2 has none
        siblings = {"fxlora siblings"} if res["model"] == "llama-1.2b" else set()
        assert siblings <= set(res["checks"]) and all(res["checks"][n]["ok"] for n in siblings)
        for shape in res["shapes"].values():
            rows = {*impls, "fxlora lowered", *siblings}
            assert set(shape["forward_ratio"]) == rows and set(shape["train_ratio"]) == rows | {bench.FLOOR}
            assert bench.FLOOR in shape["peak_train_bytes"] or not shape["peak_train_bytes"]  # CUDA only
    assert len(data["models"][0]["shapes"]) == 2  # GPT-2 at two shapes
    llama = next(iter(data["models"][1]["shapes"].values()))
    assert set(llama["compiled_forward_ratio"]) == {"fxlora"} and set(llama["compiled_train_ratio"]) == {"fxlora"}
    assert set(llama["compile_s"]) == {"forward/base", "forward/fxlora", "train/full FT", "train/fxlora"}
    assert png.exists() or any("matplotlib" in n for n in data["notes"])
    assert "unmerged forward / base" in data["markdown"] and "| fxlora lowered |" in data["markdown"]
    assert f"| {bench.FLOOR} |" in data["markdown"]


@pytest.mark.parametrize("model", ["gpt2-medium", "llama-1.2b"])
def test_the_floor_trains_the_norms_above_the_first_and_no_linear_layer(model):
    base = build_model(model, True, "cpu", torch.float32, layers=2)
    before = [p.requires_grad for p in base.parameters()]
    floor = bench.make_floor(base)
    assert [p.requires_grad for p in base.parameters()] == before  # a copy: the base is untouched
    assert not {p.data_ptr() for p in base.parameters()} & {p.data_ptr() for p in floor.module.parameters()}
    names = {n for n, p in floor.module.named_parameters() if p.requires_grad}
    norms = [n for n, m in floor.module.named_modules() if "norm" in type(m).__name__.lower()]
    first = {"gpt2-medium": "transformer.h.0.ln_1", "llama-1.2b": "model.layers.0.input_layernorm"}[model]
    assert norms[0] == first and len(norms) > 2
    assert {n.rpartition(".")[0] for n in names} == set(norms[1:])
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    loss = bench.lm_loss(floor(ids), ids)
    loss.backward()
    assert all(floor.module.get_parameter(n).grad is not None for n in names)
    assert torch.equal(floor(ids), bench.Impl("base", base)(ids))  # the base's function


def test_bench_fsdp_small_runs_both_from_the_same_model(tmp_path):
    # one process, no sharding (tests/test_distributed.py runs FSDP2 itself)
    data = {}
    for impl in ("fxlora", "peft"):
        out = tmp_path / f"{impl}.json"
        argv = ["--impl", impl, "--small", "--steps", "3", "--warmup", "1", "--seq", "16", "--out", str(out)]
        assert bench_fsdp.main(argv) == 0
        data[impl] = json.loads(out.read_text())
        assert data[impl]["environment"]["command"] == "python -m fxlora.tools.bench_fsdp " + " ".join(argv)
    for d in data.values():
        assert d["world_size"] == 1 and d["trainable"] == 32768 and d["tokens_per_s_per_gpu"] > 0
        assert d["loss_last"] != d["loss_first"]  # the adapters train
    # the same model and batches: the first timed step's loss is the same for both
    assert abs(data["fxlora"]["loss_first"] - data["peft"]["loss_first"]) < 1e-3


def test_bench_scale_small(tmp_path):
    out = tmp_path / "scale.json"
    argv = ["--small", "--depths", "2,3", "--export-depths", "1", "--out", str(out)]
    assert bench_scale.main(argv) == 0
    data = json.loads(out.read_text())
    assert not data["failures"] and not data["partial"]
    assert data["environment"]["command"] == "python -m fxlora.tools.bench_scale " + " ".join(argv)
    rows = ("rewrite", "first fold", "fold", "refresh")
    for kind, depths, per_layer in (("symbolic", [2, 3], 4), ("export", [1], 7)):
        section = data["depth"][kind]
        assert [r["layers"] for r in section["rows"]] == depths
        for r in section["rows"]:
            assert r["sites"] == per_layer * r["layers"] and set(r["ms"]) == set(rows)
            assert r["check"]["folded_vs_unmerged"] < 1e-4 and r["check"]["lora_effect"] > 1e-3
            assert all(r["ms_per_layer"][k] == r["ms"][k] / r["layers"] for k in rows)
        if len(depths) > 1:  # one export depth keeps the test short (each capture takes a second)
            assert set(section["linearity"]) == set(rows)
            assert all(0 < v["per_layer_ratio"] and v["r2"] <= 1 for v in section["linearity"].values())
        assert ("capture_s" in section["rows"][0]) == (kind == "export")
    (peers,) = data["peers"]
    assert peers["sites"] == 4 * 2 and peers["checks"]["folded_vs_merged"] < 1e-4
    assert set(peers["ratios"]) == {"fold / merge", "first fold / merge", "refresh / merge", "rewrite / get_peft_model",
                                    "capture + rewrite / torch.export"}
    assert all(v > 0 for v in peers["ratios"].values())
    llama = data["llama7b"]  # two layers of Llama-7B's width on meta: the counts come from the architecture
    assert llama["layers"] == 2 and llama["sites"] == 14 and llama["lora_params"] == 2 * 16 * (4 * 8192 + 3 * 15104)
    assert llama["median_s"]["rewrite_report_s"] < 60 and llama["static_shapes_median_s"]["rewrite_report_s"] < 60
    assert {t["target"].split(" (")[0] for t in data["targets"]} >= {"fold / merge <= 1.5", "Llama-7B on meta: rewrite + report < 5 s"}
    assert "| layers |" in data["markdown"]
