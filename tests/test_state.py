"""fxlora.state: trainable flags and LoRA-only checkpoints, all or nothing."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import fxlora
import loralib
import pytest
import torch
from fxlora import CheckpointError, Rule
from torch import nn

from helpers import TinyTransformer, randomize_lora

RULES = [fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]), fxlora.Rule("head", r=2, alpha=2)]


def _trained(seed=0):
    torch.manual_seed(seed)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, RULES)
    randomize_lora(gm, seed=seed)
    return model, gm


def test_save_then_load_into_a_fresh_rewrite_round_trips_bit_exactly(tmp_path):
    model, gm = _trained()
    path = fxlora.save_lora(gm, tmp_path / "adapter.safetensors")
    fresh = fxlora.rewrite(model, RULES)
    fxlora.load_lora(fresh, path)
    for k, v in fxlora.lora_state_dict(gm).items():
        assert torch.equal(fxlora.lora_state_dict(fresh)[k], v)
    x = torch.randint(0, 40, (2, 5))
    assert torch.equal(fresh(x), gm(x))
    # kilobytes, not the model: the file holds the LoRA tensors only
    lora_bytes = sum(v.numel() * 4 for v in fxlora.lora_state_dict(gm).values())
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    size = path.stat().st_size
    assert lora_bytes <= size < lora_bytes + 4096 and size < model_bytes / 4
    assert not list(tmp_path.glob(".*.tmp.*"))  # the temporary file was renamed away


def test_bias_is_saved_when_asked(tmp_path):
    model, gm = _trained()
    fxlora.mark_only_lora_as_trainable(gm, bias="lora_only")
    with torch.no_grad():
        gm.get_parameter("head.bias").add_(1.0)
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors", bias="lora_only")
    fresh = fxlora.rewrite(model, RULES)
    fxlora.load_lora(fresh, path)
    assert torch.equal(fresh.get_parameter("head.bias"), gm.get_parameter("head.bias"))
    assert not torch.equal(model.head.bias, gm.get_parameter("head.bias"))  # model untouched


def test_wrong_alpha_or_rank_is_refused(tmp_path):
    model, gm = _trained()
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors")
    other_alpha = fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=4, alpha=4, enable_lora=[True, False, True]), RULES[1]])
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(other_alpha).items()}
    with pytest.raises(CheckpointError, match="alpha=8.*alpha=4"):
        fxlora.load_lora(other_alpha, path)
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(other_alpha).items())
    other_rank = fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=2, alpha=8, enable_lora=[True, False, True]), RULES[1]])
    with pytest.raises(CheckpointError, match="r=4"):
        fxlora.load_lora(other_rank, path)


def test_truncated_or_missing_files_are_refused(tmp_path):
    _, gm = _trained()
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fxlora.load_lora(gm, bad)
    with pytest.raises(CheckpointError, match="no LoRA checkpoint"):
        fxlora.load_lora(gm, tmp_path / "absent.safetensors")
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(gm).items())


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    _, gm = _trained()
    other = fxlora.rewrite(nn.Sequential(nn.Linear(4, 4)), [fxlora.Rule("0", r=2, alpha=2)])
    path = fxlora.save_lora(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="missing LoRA keys.*unexpected keys: 0.lora_A"):
        fxlora.load_lora(gm, path)


def _gm():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=2), fxlora.Rule("head", r=2, alpha=2)])
    randomize_lora(gm)
    return gm


@pytest.mark.parametrize(
    "mutate, text",
    [
        (lambda sd: sd.pop("head.lora_A"), "missing LoRA keys: head.lora_A"),
        (lambda sd: sd.__setitem__("head.lora_C", torch.zeros(1)), "unexpected keys: head.lora_C"),
        (lambda sd: sd.__setitem__("head.lora_A", torch.zeros(3, 16)), "has shape (3, 16), the model expects (2, 16)"),
        (lambda sd: sd.__setitem__("head.lora_B", torch.zeros(40, 2, dtype=torch.long)), "must be floating point"),
        (lambda sd: sd.__setitem__("head.lora_B", [1, 2]), "not a tensor"),
    ],
)
def test_bad_checkpoints_load_nothing(mutate, text):
    gm = _gm()
    good = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items()}
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    mutate(good)
    with pytest.raises(CheckpointError) as info:
        fxlora.load_lora_state_dict(gm, good)
    assert text in str(info.value) and "nothing was loaded" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


TRAIN_RULES = [
    fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]),
    fxlora.Rule("blocks.*.proj", r=4, alpha=8),
]


def _grads(gm, x):
    gm.zero_grad(set_to_none=True)
    gm(x).float().logsumexp(-1).mean().backward()
    return {n for n, p in gm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_lora_and_selected_biases_get_gradients(bias):
    torch.manual_seed(0)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, TRAIN_RULES, bias=bias)
    randomize_lora(gm)
    lora = set(fxlora.lora_parameter_names(gm))
    got = _grads(gm, torch.randint(0, 40, (2, 5)))
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert got == trainable
    if bias == "none":
        assert trainable == lora
    elif bias == "all":
        assert trainable == lora | {n for n, _ in gm.named_parameters() if n.endswith(".bias")}
    else:
        assert trainable == lora | {f"blocks.{i}.{m}.bias" for i in range(2) for m in ("qkv", "proj")}
    assert all(p.requires_grad for p in model.parameters()), "the input model's flags changed"


def test_mark_only_lora_as_trainable_switches_modes():
    gm = fxlora.rewrite(TinyTransformer(), TRAIN_RULES)
    fxlora.mark_only_lora_as_trainable(gm, bias="lora_only")
    assert gm.get_parameter("blocks.0.qkv.bias").requires_grad
    fxlora.mark_only_lora_as_trainable(gm)
    assert not gm.get_parameter("blocks.0.qkv.bias").requires_grad


def _proj_gm():
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
    gm = _proj_gm()
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
    gm = _proj_gm()
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
    gm = _proj_gm()
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
