"""Tied and shared weights, safe checkpoints, atomic saves, and fuzzed command-line input."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import loralib
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxlora
from fxlora import CheckpointError, Rule, RuleError
from fxlora.tools.cli import main
from helpers import TinyTransformer, randomize_lora


# --------------------------------------------------------------------------------------------- #
# Tied and shared weights
# --------------------------------------------------------------------------------------------- #


class TiedLM(nn.Module):
    """GPT-2 style: the LM head reuses the token embedding's weight."""

    def __init__(self, functional_head: bool = False):
        super().__init__()
        self.wte = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 8)
        self.functional_head = functional_head
        if not functional_head:
            self.lm_head = nn.Linear(8, 30, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        h = torch.tanh(self.proj(self.wte(idx)))
        return F.linear(h, self.wte.weight) if self.functional_head else self.lm_head(h)


@pytest.mark.parametrize("functional_head", [False, True])
@pytest.mark.parametrize("target", ["wte", "lm_head", "*"])
def test_tied_embedding_and_head_are_refused_naming_both_uses(functional_head, target):
    model = TiedLM(functional_head)
    if functional_head and target == "lm_head":
        target = "wte"  # the functional head is named after the weight it reads
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(model, [Rule(target, r=2, alpha=2)])
    msg = str(info.value)
    assert "tied or shared" in msg and "Untie" in msg
    assert ("lm_head" in msg or "linear" in msg) and "wte" in msg


def test_untied_model_adapts_both_and_folds_each_once():
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())  # untie, as the error says
    gm = fxlora.rewrite(model, [Rule("wte", r=2, alpha=2), Rule("lm_head", r=2, alpha=2)])
    randomize_lora(gm)
    x = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)


def test_unadapted_tied_weights_stay_tied_and_untouched():
    model = TiedLM()
    gm = fxlora.rewrite(model, [Rule("proj", r=2, alpha=2)])
    randomize_lora(gm)
    folded = fxlora.fold(gm)
    assert folded.get_parameter("wte.weight") is folded.get_parameter("lm_head.weight")
    assert torch.equal(folded.get_parameter("wte.weight"), model.wte.weight)


def test_a_module_shared_under_two_names_is_one_site():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = self.a  # the same module registered twice

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Shared()
    for target in ("a", "b"):  # either name selects it
        gm = fxlora.rewrite(model, [Rule(target, r=2, alpha=2)])
        assert list(fxlora.graph_sites(gm)) == ["a"]
        randomize_lora(gm)
        x = torch.randn(3, 6)
        ref = model.a.weight + gm.get_parameter("a.lora_B") @ gm.get_parameter("a.lora_A")
        manual = F.linear(torch.relu(F.linear(x, ref, model.a.bias)), ref, model.a.bias)
        torch.testing.assert_close(gm(x), manual, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), manual, atol=1e-5, rtol=1e-5)


def test_a_weight_read_by_a_module_and_a_functional_call_is_refused():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.fc.weight)

    with pytest.raises(RuleError, match="also read by"):
        fxlora.rewrite(TwoUses(), [Rule("fc", r=1, alpha=1)])


# --------------------------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------------------------- #


def _gm():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.proj", r=2, alpha=2)])
    randomize_lora(gm)
    return gm


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_does_not_run(tmp_path):
    gm = _gm()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    state["blocks.0.proj.lora_A"] = _Exploit(marker)
    with open(path, "wb") as f:
        pickle.dump(state, f)
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        fxlora.load_lora(gm, path)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(gm).items())


def test_loralib_pt_checkpoint_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)

    class LoraBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = loralib.Linear(8, 8, r=2, lora_alpha=4)

        def forward(self, x):
            return self.q(x)

    oracle = LoraBlock()
    with torch.no_grad():
        oracle.q.lora_B.normal_()
    torch.save(loralib.lora_state_dict(oracle), tmp_path / "lora.pt")
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x)

    plain = Plain()
    plain.load_state_dict({k: v for k, v in oracle.state_dict().items() if "lora_" not in k})
    gm = fxlora.rewrite(plain, [Rule("q", r=2, alpha=4)])
    fxlora.load_lora(gm, tmp_path / "lora.pt")
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), oracle(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("corrupt", ["truncate", "flip_header", "garbage", "empty"])
def test_corrupted_files_are_refused(corrupt, tmp_path):
    gm = _gm()
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    if corrupt == "truncate":
        data = data[: len(data) - 7]
    elif corrupt == "flip_header":
        data[10:20] = b"}}}}}}}}}}"
    elif corrupt == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    with pytest.raises(CheckpointError):
        fxlora.load_lora(gm, path)
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(gm).items())


def test_non_finite_checkpoint_is_refused():
    gm = _gm()
    bad = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    bad["blocks.1.proj.lora_B"][0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="blocks.1.proj.lora_B' holds NaN or Inf"):
        fxlora.load_lora_state_dict(gm, bad)


_SAVER = textwrap.dedent(
    """
    import sys, torch, fxlora
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    gm = fxlora.rewrite(model, [fxlora.Rule("*", r=1024, alpha=1)])
    fxlora.save_lora(gm, sys.argv[1])          # a complete first version
    print("saved", flush=True)
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            gm.get_parameter(name).fill_(1.0)
    while True:                                 # keep rewriting it until killed
        fxlora.save_lora(gm, sys.argv[1])
    """
)


def test_killing_a_save_never_leaves_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "adapter.safetensors"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    fresh = fxlora.rewrite(model, [Rule("*", r=1024, alpha=1)])
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fxlora.load_lora(fresh, path)  # old or new, but whole: never a torn file
        state = fxlora.lora_state_dict(fresh)
        b_first = [bool((state[f"{i}.lora_B"] == 0).all()) for i in ("0", "1")]  # first version: B = 0
        b_second = [bool((state[f"{i}.lora_B"] == 1).all()) for i in ("0", "1")]  # later ones: all ones
        assert all(b_first) or (all(b_second) and all(bool((state[f"{i}.lora_A"] == 1).all()) for i in ("0", "1")))
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.tmp")]
    assert len(leftovers) <= 3  # a killed writer may leave its temporary file, never the target


# --------------------------------------------------------------------------------------------- #
# Fuzzing the rules parser and the CLI
# --------------------------------------------------------------------------------------------- #

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_rule_tables = st.dictionaries(
    st.sampled_from(["target", "type", "r", "alpha", "dropout", "enable_lora", "fan_in_fan_out", "rank", ""]),
    _values, max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_values, st.fixed_dictionaries({"rule": st.lists(_rule_tables, max_size=3)}), st.dictionaries(st.text(max_size=5), _values)))
def test_rules_parser_raises_only_rule_errors(data):
    try:
        rules = fxlora.rules_from_data(data)
    except RuleError as e:
        assert str(e)
    else:
        assert rules and all(isinstance(r, Rule) for r in rules)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_cli_never_shows_a_traceback_on_any_rules_file(tmp_path, capsys, text):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    code = main(["report", "fxlora.zoo:gpt2_tiny", "--rules", str(path), "--format", "json"])
    err = capsys.readouterr().err
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("fxlora report: ") and len(err.strip().splitlines()) == 1


_arg = st.one_of(
    st.sampled_from(["report", "paper", "demo", "--rules", "--format", "--budget", "--meta", "--fidelity", "--adapter",
                     "fxlora.zoo:gpt2_tiny", "fxlora.zoo:nope", "os:getcwd", "json", "1%", "-1", "bf16", "x:y:z", ""]),
    st.text(max_size=10),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_arg, max_size=6))
def test_cli_fuzzed_arguments_exit_cleanly(capsys, argv):
    if argv[:1] == ["demo"]:
        argv = ["demo", "--steps", "x"]  # keep the fuzz fast: a demo run is tested elsewhere
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits (--help, usage errors)
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err


def test_reading_a_weights_shape_or_dtype_is_not_a_second_use():
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype)) * self.fc.weight.shape[0] + self.fc.weight.size(1)

    model = Peeks()
    gm = fxlora.rewrite(model, [Rule("fc", r=1, alpha=1)])
    randomize_lora(gm)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)
