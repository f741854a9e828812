"""PEFT as the oracle and as a format: adapters written by PeftModel.save_pretrained load into fxlora
with PEFT's numbers, and fxlora's adapters load into PeftModel.from_pretrained."""

from __future__ import annotations

import copy
import json
import os
import stat
import time

import fxlora
from fxlora.patterns import compile_pattern
import pytest
import torch
from fxlora import CheckpointError, Rule
from torch import nn

from processes import die_at, fork, kill_loop, read_while_writing, two_versions, version_of, wait

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

ATOL = 1e-5


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)))


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
CASES = {
    "gpt2": (_gpt2, (IDS,), {"use_cache": False},
             dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=4, lora_alpha=8)),
    "bert": (_bert, (IDS,), {},
             dict(target_modules=["query", "value", "word_embeddings"], r=4, lora_alpha=16, lora_dropout=0.1)),
    "llama": (_llama, (IDS,), {"use_cache": False},
              dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
                   lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"gate_proj": 3},
                   use_rslora=True)),
    "cnn": (_CNN, (torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)),), {},
            dict(target_modules=["conv", "conv2", "fc"], r=4, lora_alpha=8)),
}


def _out(o):
    return o if isinstance(o, torch.Tensor) else (o.logits if hasattr(o, "logits") else o[0])


def _peft_model(name, folder):
    factory, x, kw, config = CASES[name]
    pm = peft.get_peft_model(factory(), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_adapter_loads_with_peft_numbers(name, tmp_path):
    factory, x, kw, _ = CASES[name]
    pm = _peft_model(name, tmp_path / "peft")
    base = factory()
    rules = fxlora.peft_rules(tmp_path / "peft")
    gm = fxlora.rewrite(base, rules, example_inputs=x, example_kwargs=kw).eval()
    fxlora.load_peft_adapter(gm, tmp_path / "peft")
    with torch.no_grad():
        expected = _out(pm(*x, **kw))
        assert not torch.allclose(expected, _out(base(*x, **kw)), atol=1e-4)
        torch.testing.assert_close(_out(gm(*x, **kw)), expected, atol=ATOL, rtol=0)
        merged = copy.deepcopy(pm).merge_and_unload()
        torch.testing.assert_close(_out(fxlora.fold(gm)(*x, **kw)), _out(merged(*x, **kw)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fxlora_adapter_loads_into_peft(name, tmp_path):
    factory, x, kw, _ = CASES[name]
    _peft_model(name, tmp_path / "peft")
    gm = fxlora.rewrite(factory(), fxlora.peft_rules(tmp_path / "peft"), example_inputs=x, example_kwargs=kw).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for v in fxlora.lora_state_dict(gm).values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    fxlora.save_peft_adapter(gm, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded(*x, **kw)), _out(gm(*x, **kw)), atol=ATOL, rtol=0)


def test_rules_written_by_hand_load_a_peft_adapter(tmp_path):
    _peft_model("gpt2", tmp_path / "peft")
    x, kw = CASES["gpt2"][1:3]
    gm = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.(c_attn|c_proj)", r=4, alpha=8)], example_inputs=x, example_kwargs=kw)
    fxlora.load_peft_adapter(gm, tmp_path / "peft")


def test_mismatches_are_refused_and_load_nothing(tmp_path):
    _peft_model("gpt2", tmp_path / "peft")
    x, kw = CASES["gpt2"][1:3]

    def snapshot(gm):
        return {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}

    other_rank = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.(c_attn|c_proj)", r=2, alpha=4)], example_inputs=x, example_kwargs=kw)
    before = snapshot(other_rank)
    with pytest.raises(CheckpointError, match="r=4 and scale=2.*r=2"):
        fxlora.load_peft_adapter(other_rank, tmp_path / "peft")
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(other_rank).items())

    fewer = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.c_attn", r=4, alpha=8)], example_inputs=x, example_kwargs=kw)
    with pytest.raises(CheckpointError, match="which the model does not"):
        fxlora.load_peft_adapter(fewer, tmp_path / "peft")

    other_model = fxlora.rewrite(_bert(), [Rule("re:.*\\.query", r=4, alpha=8)], example_inputs=x)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fxlora.load_peft_adapter(other_model, tmp_path / "peft")

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_dora"):
        fxlora.peft_rules(tmp_path / "peft")
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        fxlora.peft_rules(tmp_path / "nowhere")


def test_masked_fused_projection_cannot_be_written_for_peft(tmp_path):
    x, kw = CASES["gpt2"][1:3]
    gm = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.c_attn", r=4, alpha=8, enable_lora=[True, False, True])],
                        example_inputs=x, example_kwargs=kw)
    with pytest.raises(CheckpointError, match="no per-slice mask"):
        fxlora.save_peft_adapter(gm, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_a_tied_site_cannot_be_written_for_peft(tmp_path):
    x, kw = CASES["gpt2"][1:3]
    gm = fxlora.rewrite(_gpt2(), [Rule("lm_head", r=2, alpha=4)], example_inputs=x, example_kwargs=kw)
    assert [s.kind for s in fxlora.graph_sites(gm).values()] == ["tied"]
    with pytest.raises(CheckpointError, match="is a tied site.*fxlora.save_lora"):
        fxlora.save_peft_adapter(gm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- an untrusted config: every field validated, named when wrong -----------------------------------


class _Named(nn.Module):
    """Modules with long names, so that a backtracking matcher would take forever on them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"x" * 30: nn.Linear(8, 8), "y" * 30: nn.Linear(8, 8)})

    def forward(self, x):
        return self.layers["y" * 30](self.layers["x" * 30](x))


def _saved(tmp_path, r=4, alpha=8):
    gm = fxlora.rewrite(_Named(), [Rule("layers.*", r=r, alpha=alpha)])
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            gm.get_parameter(name).normal_()
    folder = fxlora.save_peft_adapter(gm, tmp_path / "adapter")
    return gm, folder


def _edit(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


X, Y = "layers." + "x" * 30, "layers." + "y" * 30


@pytest.mark.parametrize(
    "changes, text",
    [
        (dict(peft_type="IA3"), "field 'peft_type' is 'IA3'"),
        (dict(r=0), "field 'r' must be a positive int"),
        (dict(r="4"), "field 'r' must be a positive int"),
        (dict(r=True), "field 'r' must be a positive int"),
        (dict(r=2**40), "field 'r' must be a positive int"),
        (dict(r=8), "field 'r' gives module 'layers.xxx"),  # the tensors have rank 4
        (dict(rank_pattern={"x+": 2}), "field 'rank_pattern['x+']' gives module 'layers.xxx"),
        (dict(rank_pattern=[4]), "field 'rank_pattern' must be an object"),
        (dict(rank_pattern={"x": 0}), "field 'rank_pattern' entry 'x' must be a positive int"),
        (dict(rank_pattern={r"(x)\1": 4}), "field 'rank_pattern' key '(x)\\\\1'"),
        (dict(alpha_pattern={"x": "big"}), "field 'alpha_pattern' entry 'x' must be a positive finite number"),
        (dict(alpha_pattern={"(?=x)": 2}), "lookahead"),
        (dict(lora_alpha=-1), "field 'lora_alpha' must be a positive finite number"),
        (dict(lora_alpha="8"), "field 'lora_alpha'"),
        (dict(lora_dropout=1.5), "field 'lora_dropout' must be null or a number in [0, 1)"),
        (dict(target_modules=3), "field 'target_modules' must be null or a string"),
        (dict(target_modules=["q", 1]), "field 'target_modules'"),
        (dict(target_modules=["q_proj"]), "field 'target_modules' (['q_proj']) does not select module"),
        (dict(target_modules="(?i)layers.*"), "field 'target_modules'"),
        (dict(exclude_modules=["x" * 30]), "field 'exclude_modules' excludes module"),
        (dict(use_rslora="yes"), "field 'use_rslora' must be null or true or false"),
        (dict(use_dora=True), "field 'use_dora' is true"),
        (dict(modules_to_save=[3]), "field 'modules_to_save'"),
        (dict(target_parameters=["w"]), "field 'target_parameters' is set"),
        (dict(bias="some"), "field 'bias'"),
        (dict(init_lora_weights="pissa_niter_4"), "changes the base model's weights"),
        (dict(init_lora_weights=3), "field 'init_lora_weights'"),
        (dict(layers_to_transform=["0"]), "field 'layers_to_transform'"),
        (dict(base_model_name_or_path=7), "field 'base_model_name_or_path'"),
        (dict(megatron_config={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": {"l": {"m": {"n": {"o": {"p": 1}}}}}}}}}}}}}}}}), "field 'megatron_config.a.b.c.d.e.f.g.h.i.j.k.l.m.n.o' is nested"),
    ],
)
def test_bad_config_fields_are_refused_by_name_and_load_nothing(changes, text, tmp_path):
    gm, folder = _saved(tmp_path)
    _edit(folder, **changes)
    with pytest.raises(CheckpointError) as info:
        fxlora.peft_rules(folder)
    assert text in str(info.value), str(info.value)
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    with torch.no_grad():
        for v in fxlora.lora_state_dict(gm).values():
            v.zero_()
    zeros = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    with pytest.raises(CheckpointError):
        fxlora.load_peft_adapter(gm, folder)
    assert all(torch.equal(zeros[k], v) for k, v in fxlora.lora_state_dict(gm).items())
    assert before  # the adapter was not empty


def test_json_that_python_would_accept_is_still_refused(tmp_path):
    _, folder = _saved(tmp_path)
    path = folder / "adapter_config.json"
    text = path.read_text()
    for bad, reason in ((text.replace('"r": 4', '"r": NaN'), "NaN"), (text[:-2] + ', "r": 4}', "'r' appears twice"),
                        ('{"a":' * 300 + "1" + "}" * 300, "levels deep")):
        path.write_text(bad)
        with pytest.raises(CheckpointError, match=reason):
            fxlora.peft_rules(folder)


def test_the_rank_comes_from_the_tensors(tmp_path):
    _, folder = _saved(tmp_path, r=4, alpha=8)
    _edit(folder, rank_pattern={"x+": 4}, alpha_pattern={"y+": 2}, target_modules=r"layers\.(x+|y+)")
    rules = {rule.target: rule for rule in fxlora.peft_rules(folder)}
    assert (rules[X].r, rules[X].alpha, rules[Y].r, rules[Y].alpha) == (4, 8.0, 4, 2.0)


def test_patterns_from_the_config_run_in_bounded_time(tmp_path):
    _, folder = _saved(tmp_path)
    # with re, '(.*\.)?((.|.|.)*Z)$' on a 37-character name takes 3**30 steps
    _edit(folder, rank_pattern={"(.|.|.)*Z": 2}, alpha_pattern={"(x|xx)+y": 3}, target_modules="(.|.|.)*")
    start = time.perf_counter()
    rules = fxlora.peft_rules(folder)
    assert time.perf_counter() - start < 2.0
    assert [rule.r for rule in rules] == [4, 4]


@pytest.mark.parametrize(
    "changes, field",
    [
        # 60 keys of 12,000 counted repeats each: bounded one by one, hours in all before the total budget
        (dict(rank_pattern={f".{{0,12000}}Q{i}": 4 for i in range(60)}), "rank_pattern"),
        (dict(alpha_pattern={f"(.?){{4000}}{i}": 2 for i in range(60)}), "alpha_pattern"),
        (dict(rank_pattern={f"n{i}": 4 for i in range(20_000)}), "rank_pattern"),  # many small ones
        (dict(target_modules=[f"n{i}" for i in range(20_000)]), "target_modules"),
    ],
)
def test_the_work_of_all_the_configs_patterns_together_is_bounded(changes, field, tmp_path):
    _, folder = _saved(tmp_path)
    _edit(folder, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"field '{field}'.*bounds the work a file may ask for"):
        fxlora.peft_rules(folder)
    assert time.perf_counter() - start < 10.0  # about a second on one slow core


def test_a_large_pattern_against_a_long_name_is_refused_in_bounded_time():
    from fxlora.patterns import MAX_MATCH_WORK

    pattern = compile_pattern("(.?){20000}Z", field="adapter_config.json: field 'target_modules'", error=CheckpointError)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"field 'target_modules'.*more than {MAX_MATCH_WORK} automaton steps"):
        pattern.fullmatch("layers." + "x" * 5000)
    assert time.perf_counter() - start < 10.0  # unbounded, this took 8 s per 500 characters
    assert compile_pattern(r"(.*\.)?(q|v)_proj", field="f").fullmatch("model." * 2000 + "q_proj")  # long, simple: fine


@pytest.mark.parametrize(
    "changes, text",
    [
        (dict(lora_alpha=1e308, use_rslora=True), r"field 'lora_alpha' \(1e\+308\) with field 'use_rslora' true"),
        (dict(alpha_pattern={"x+": 1e308}, use_rslora=True), r"field 'alpha_pattern\['x\+'\]'.* field 'use_rslora'"),
        (dict(lora_alpha=1e300), r"field 'lora_alpha' \(1e\+300\) gives .* lora_alpha / r = 2.5e\+299"),  # > float32
        (dict(lora_alpha=5e-324), "field 'lora_alpha' .*lora_alpha / r = 0.0"),  # the scale underflows to 0
        (dict(lora_alpha=1e-44), r"field 'lora_alpha' \(1e-44\)"),  # positive in float64, 0 or subnormal in float32
        (dict(alpha_pattern={"x+": 1e-60}), r"field 'alpha_pattern\['x\+'\]'"),
    ],
)
def test_a_scale_that_is_not_finite_is_refused_naming_the_config_fields(changes, text, tmp_path):
    _, folder = _saved(tmp_path)
    _edit(folder, **changes)
    with pytest.raises(CheckpointError, match=text) as info:
        fxlora.peft_rules(folder)
    assert "Rule(" not in str(info.value) and "normal float32 numbers" in str(info.value)


def test_a_legacy_bin_adapter_is_read_by_its_bytes(tmp_path):
    gm, folder = _saved(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    os.unlink(folder / "adapter_model.safetensors")
    fresh = fxlora.rewrite(_Named(), fxlora.peft_rules(folder))
    fxlora.load_peft_adapter(fresh, folder)
    assert all(torch.equal(fxlora.lora_state_dict(fresh)[k], v) for k, v in fxlora.lora_state_dict(gm).items())


# -- the folder: other files kept, modes, read-only ----------------------------------------------


def test_saving_over_a_folder_keeps_its_other_files_and_modes(tmp_path):
    gm, folder = _saved(tmp_path)
    (folder / "README.md").write_text("model card")
    (folder / "tokenizer.json").write_text("{}")
    os.chmod(folder / "adapter_config.json", 0o600)
    fxlora.save_peft_adapter(gm, folder)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert (folder / "README.md").read_text() == "model card"
    assert stat.S_IMODE(os.stat(folder / "adapter_config.json").st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    os.chmod(folder / "adapter_model.safetensors", 0o444)
    with pytest.raises(CheckpointError, match="read-only"):
        fxlora.save_peft_adapter(gm, folder)


def test_a_new_folder_gets_the_umasks_modes(tmp_path):
    gm = fxlora.rewrite(_Named(), [Rule("layers.*", r=4, alpha=8)])
    old = os.umask(0o022)
    try:
        folder = fxlora.save_peft_adapter(gm, tmp_path / "deep" / "adapter")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(folder / "adapter_model.safetensors").st_mode) == 0o644


# -- killed savers and concurrent readers: config and weights switch together -----------------------


def _folder_is_clean(folder):
    return sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("step, expected", [("folder-staged", 1.0), ("folder-switched", 2.0), ("folder-cleaned", 2.0)])
def test_a_save_killed_between_its_steps_leaves_the_old_or_the_new_adapter(step, expected, tmp_path):
    model, (one, two) = two_versions()
    folder = tmp_path / "adapter"
    fxlora.save_peft_adapter(one, folder)
    (folder / "README.md").write_text("card")
    pid = fork(lambda: (die_at(step), fxlora.save_peft_adapter(two, folder)))
    assert wait(pid) == -9
    assert _folder_is_clean(folder)  # nothing staged inside it, whatever the moment
    fresh = fxlora.rewrite(model, fxlora.peft_rules(folder))
    fxlora.load_peft_adapter(fresh, folder)
    assert version_of(fresh) == expected and fresh.get_parameter("0.lora_A") is not None
    assert [rule.alpha for rule in fxlora.peft_rules(folder)] == [expected, expected]  # config of that version
    fxlora.save_peft_adapter(one, folder)  # the next save removes what the dead one left beside the folder
    assert sorted(os.listdir(tmp_path)) == ["adapter"] and _folder_is_clean(folder)


def test_killing_save_peft_adapter_at_random_moments_switches_config_and_weights_together(tmp_path):
    model, (one, two) = two_versions()
    folder = tmp_path / "adapter"
    fxlora.save_peft_adapter(one, folder)
    (folder / "README.md").write_text("card")
    readers = {1.0: fxlora.rewrite(model, [Rule("*", r=64, alpha=1)]), 2.0: fxlora.rewrite(model, [Rule("*", r=64, alpha=2)])}

    def on_disk():
        assert _folder_is_clean(folder)  # nothing staged inside it
        alpha = fxlora.peft_rules(folder)[0].alpha  # the config's version...
        fxlora.load_peft_adapter(readers[alpha], folder)  # ...loads, so the weights are that version's
        assert version_of(readers[alpha]) == alpha
        return alpha

    saves = {1.0: lambda: fxlora.save_peft_adapter(one, folder), 2.0: lambda: fxlora.save_peft_adapter(two, folder)}
    kills, changed = kill_loop(saves, on_disk)
    print(f"folder kill loop: {kills} kills, {changed} of them after a switch")
    fxlora.save_peft_adapter(one, folder)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # what the killed savers left beside it is gone


def test_readers_during_saves_get_the_old_or_the_new_adapter(tmp_path):
    folder = tmp_path / "adapter"
    # a refusal: the other version (its scale), or a folder switched under the reader twice
    loads, refused = read_while_writing(lambda gm: fxlora.save_peft_adapter(gm, folder),
                                        lambda gm: fxlora.load_peft_adapter(gm, folder), ("scale", "kept changing"))
    assert loads > 10 and refused > 10, (loads, refused)
    print(f"folder reader/writer: {loads} loads, {refused} refusals")


def test_two_peft_adapters_loaded_into_fxlora_give_peft_outputs(tmp_path):
    """Issue 10: PEFT's set_adapter and its mixed-batch adapter_names=, against fxlora's set_adapter and serve."""
    import copy as _copy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.q, self.v, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)

        def forward(self, idx):
            h = self.emb(idx)
            return self.head(torch.tanh(self.q(h)) + self.v(h))

    torch.manual_seed(0)
    base = Net()
    configs = {
        "t1": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
        "t2": peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q", "emb"]),
        "t3": peft.LoraConfig(r=2, lora_alpha=2, target_modules=["v"], modules_to_save=["head"]),
    }
    pm = peft.get_peft_model(_copy.deepcopy(base), configs["t1"], adapter_name="t1")
    for name in ("t2", "t3"):
        pm.add_adapter(name, configs[name])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    folders = {}
    for name in configs:
        pm.save_pretrained(tmp_path, selected_adapters=[name])
        folders[name] = tmp_path / name  # PEFT saves a named adapter in a folder of its name
    gm = fxlora.rewrite(base, fxlora.peft_rules(folders["t1"]), adapter="t1")
    fxlora.load_peft_adapter(gm, folders["t1"], adapter="t1")
    for name in ("t2", "t3"):
        fxlora.add_adapter(gm, fxlora.peft_rules(folders[name]), name, train_modules=fxlora.peft_train_modules(folders[name]))
        fxlora.load_peft_adapter(gm, folders[name], adapter=name)
    assert fxlora.peft_train_modules(folders["t3"]) == ["head"]
    pm.eval()
    idx = torch.randint(0, 30, (4, 6))
    for name in configs:
        fxlora.set_adapter(gm, name)
        pm.set_adapter(name)
        torch.testing.assert_close(gm(idx), pm(idx), atol=1e-5, rtol=1e-5)
    # PEFT's mixed batch (adapter_names=) against fxlora's served mixed batch (PEFT's own mixed batch cannot
    # include a module trained in full that one adapter lacks, so t1 and t2 only)
    mixed_pm = peft.PeftModel.from_pretrained(_copy.deepcopy(base), folders["t1"], adapter_name="t1")
    mixed_pm.load_adapter(folders["t2"], adapter_name="t2")
    server = fxlora.serve(gm, ["t1", "t2"])
    mixed = mixed_pm.eval()(idx, adapter_names=["t2", "__base__", "t1", "t2"])
    torch.testing.assert_close(server(idx, adapter_ids=torch.tensor([1, -1, 0, 1])), mixed, atol=1e-5, rtol=1e-5)
    # the folder written back (with the head trained in full) is PEFT's
    fxlora.save_peft_adapter(gm, tmp_path / "out_t3", adapter="t3")
    reloaded = peft.PeftModel.from_pretrained(_copy.deepcopy(base), tmp_path / "out_t3").eval()
    fxlora.set_adapter(gm, "t3")
    torch.testing.assert_close(reloaded(idx), gm(idx), atol=1e-5, rtol=1e-5)
