"""fxlora.state: trainable flags and LoRA-only checkpoints, all or nothing."""

from __future__ import annotations

import json
import os
import pickle
import stat

import fxlora
import loralib
import pytest
import torch
from fxlora import CheckpointError, Rule, files
from torch import nn

from helpers import TinyTransformer, randomize_lora
from processes import die_at, fork, kill_loop, read_while_writing, two_versions, version_of, wait

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


# -- values that cannot be represented, tensors that cannot be read: nothing is written -------------


def _snapshot(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _unchanged(gm, before):
    return all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


@pytest.mark.parametrize(
    "model_dtype, value_dtype, value",
    [(torch.float32, torch.float64, 1e39), (torch.float16, torch.float32, 1e5), (torch.bfloat16, torch.float64, 1e39)],
)
def test_values_that_overflow_the_models_dtype_are_refused(model_dtype, value_dtype, value, tmp_path):
    torch.manual_seed(0)
    gm = fxlora.rewrite(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(model_dtype), [Rule("*", r=2, alpha=2)])
    randomize_lora(gm)
    before = _snapshot(gm)
    sd = {k: v.to(value_dtype) for k, v in fxlora.lora_state_dict(gm).items()}
    sd["1.lora_B"] = sd["1.lora_B"].clone()
    sd["1.lora_B"][3, 1] = value  # finite in the file's dtype, Inf in the model's
    with pytest.raises(CheckpointError, match=rf"'1.lora_B' holds values that {model_dtype} cannot represent"):
        fxlora.load_lora_state_dict(gm, sd)
    assert _unchanged(gm, before)
    path = tmp_path / "a.safetensors"
    path.write_bytes(files.safetensors_bytes({k: v.contiguous() for k, v in sd.items()}, {}))
    with pytest.raises(CheckpointError, match="cannot represent"):
        fxlora.load_lora(gm, path)
    assert _unchanged(gm, before)


class _Unreadable(torch.Tensor):
    """A tensor whose data cannot be read (a lost device, a broken extension): reading raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("detach", "copy_", "to", "clone", "contiguous", "cpu"):
            raise RuntimeError("device lost")
        return super().__torch_function__(func, types, args, kwargs or {})


def _freed(shape):
    t = torch.randn(shape)
    t.untyped_storage().resize_(0)  # what FSDP does to a freed parameter; a copy would read outside it
    return t


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda shape: torch.empty(shape, device="meta"), "is a meta tensor"),
        (lambda shape: torch.zeros(shape).to_sparse(), "torch.sparse_coo tensor"),
        (lambda shape: torch.zeros(shape).to_sparse_csr(), "torch.sparse_csr tensor"),
        (lambda shape: torch.randn(shape).as_subclass(_Unreadable), "cannot be read into the model's torch.float32"),
        (_freed, "addresses memory outside its storage"),
        (lambda shape: torch.quantize_per_tensor(torch.zeros(shape), 0.1, 0, torch.qint8), "quantized"),
        (lambda shape: torch.zeros(shape, dtype=torch.complex64), "must be floating point"),
    ],
)
def test_tensors_that_cannot_be_read_are_refused_before_anything_is_written(make, text):
    gm = _proj_gm()
    before = _snapshot(gm)
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items()}  # every other key is fine
    last = list(sd)[-1]
    sd[last] = make(tuple(sd[last].shape))  # the bad one comes last: all the others would have been copied
    with pytest.raises(CheckpointError) as info:
        fxlora.load_lora_state_dict(gm, sd)
    assert text in str(info.value) and last in str(info.value) and "nothing was loaded" in str(info.value)
    assert _unchanged(gm, before)


def test_odd_strides_load_the_values_they_address():
    gm = _proj_gm()
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items()}
    row = torch.randn(sd["blocks.0.proj.lora_A"].shape[1], dtype=torch.float64)
    sd["blocks.0.proj.lora_A"] = row.expand(sd["blocks.0.proj.lora_A"].shape)  # stride 0: every row the same
    sd["blocks.1.proj.lora_B"] = torch.randn(sd["blocks.1.proj.lora_B"].shape[::-1]).t()  # transposed
    fxlora.load_lora_state_dict(gm, sd)
    got = fxlora.lora_state_dict(gm)
    assert torch.equal(got["blocks.0.proj.lora_A"], row.float().expand_as(got["blocks.0.proj.lora_A"]))
    assert torch.equal(got["blocks.1.proj.lora_B"], sd["blocks.1.proj.lora_B"])


def test_a_model_on_the_meta_device_cannot_be_loaded_into():
    with torch.device("meta"):
        model = TinyTransformer()
    gm = fxlora.rewrite(model, [Rule("blocks.*.proj", r=2, alpha=2)])
    sd = {k: torch.zeros(v.shape) for k, v in fxlora.lora_state_dict(gm).items()}
    with pytest.raises(CheckpointError, match="on the meta device.*to_empty"):
        fxlora.load_lora_state_dict(gm, sd)


# -- every file fxlora writes, it reads back; the reader is chosen by the bytes ---------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".PT", ".pkl"])
def test_save_lora_refuses_names_that_promise_a_pickle(suffix, tmp_path):
    gm = _proj_gm()
    with pytest.raises(CheckpointError, match=r"writes safetensors.*\.safetensors"):
        fxlora.save_lora(gm, tmp_path / f"adapter{suffix}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter", "adapter.lora", "adapter.st"])
def test_save_lora_writes_what_load_lora_reads(name, tmp_path):
    gm = _proj_gm()
    fxlora.save_lora(gm, tmp_path / name)
    fresh = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.proj", r=2, alpha=2)])
    fxlora.load_lora(fresh, tmp_path / name)
    assert all(torch.equal(fxlora.lora_state_dict(fresh)[k], v) for k, v in fxlora.lora_state_dict(gm).items())


def test_the_reader_follows_the_bytes_not_the_name(tmp_path):
    gm = _proj_gm()
    fxlora.save_lora(gm, tmp_path / "a.safetensors")
    os.rename(tmp_path / "a.safetensors", tmp_path / "renamed.pt")  # fxlora's own file under a pickle's name
    other_alpha = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.proj", r=2, alpha=5)])
    with pytest.raises(CheckpointError, match="alpha=2.*alpha=5") as info:  # read as safetensors: metadata checked
        fxlora.load_lora(other_alpha, tmp_path / "renamed.pt")
    assert "pickle" not in str(info.value)
    fresh = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.proj", r=2, alpha=2)])
    fxlora.load_lora(fresh, tmp_path / "renamed.pt")
    torch.save(fxlora.lora_state_dict(gm), tmp_path / "torch.safetensors")  # a torch.save zip under our name
    fxlora.load_lora(fresh, tmp_path / "torch.safetensors")
    with open(tmp_path / "evil.safetensors", "wb") as f:
        pickle.dump({"x": _Exploit(tmp_path / "pwned")}, f)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        fxlora.load_lora(fresh, tmp_path / "evil.safetensors")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "text.safetensors").write_text("hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a torch.save file"):
        fxlora.load_lora(fresh, tmp_path / "text.safetensors")
    (tmp_path / "short.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated .only 5 bytes.* or is not a checkpoint"):
        fxlora.load_lora(fresh, tmp_path / "short.safetensors")


def test_save_lora_refuses_what_it_could_not_read_back(tmp_path):
    gm = _proj_gm()
    with torch.no_grad():
        gm.get_parameter("blocks.0.proj.lora_B")[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="nothing was written: 'blocks.0.proj.lora_B' holds NaN or Inf"):
        fxlora.save_lora(gm, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


# -- fxlora's own metadata is validated field by field ----------------------------------------------


def _with_metadata(gm, path, metadata):
    tensors = {k: v.contiguous() for k, v in fxlora.lora_state_dict(gm).items()}
    path.write_bytes(files.safetensors_bytes(tensors, metadata))
    return path


_SITES = {"blocks.0.proj": {"kind": "linear", "r": 2, "alpha": 2, "enable_lora": None}}


@pytest.mark.parametrize(
    "metadata, text",
    [
        ({"format": "fxlora.lora/9", "sites": "{}"}, "field 'format' is 'fxlora.lora/9'"),
        ({"format": "fxlora.lora/1"}, "field 'sites' is missing"),
        ({"format": "fxlora.lora/1", "sites": "{not json"}, "field 'sites' is not valid JSON"),
        ({"format": "fxlora.lora/1", "sites": "[]"}, "field 'sites' must be a JSON object"),
        ({"format": "fxlora.lora/1", "sites": '{"a": ' * 40 + "1" + "}" * 40}, "nested more than 16 levels"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": 3})}, "site 'blocks.0.proj' must be an object"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "r": 0}})}, "field 'r'"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "r": "2"}})}, "field 'r'"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "r": True}})}, "field 'r'"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "r": 2**40}})}, "field 'r'"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "alpha": -1}})}, "field 'alpha'"),
        ({"format": "fxlora.lora/1", "sites": '{"blocks.0.proj": {"kind": "linear", "r": 2, "alpha": NaN, "enable_lora": null}}'}, "NaN"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "kind": "dense"}})}, "field 'kind'"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "enable_lora": [1, 0]}})}, "field 'enable_lora'"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "extra": 1}})}, "unknown ['extra']"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {"kind": "linear", "r": 2}})}, "missing ['alpha', 'enable_lora']"),
        ({"format": "fxlora.lora/1", "sites": json.dumps({"blocks.0.proj": {**_SITES["blocks.0.proj"], "kind": "conv"}})}, "(conv) at site"),
    ],
)
def test_bad_fxlora_metadata_is_refused_naming_the_field(metadata, text, tmp_path):
    gm = _proj_gm()
    before = _snapshot(gm)
    path = _with_metadata(gm, tmp_path / "a.safetensors", metadata)
    with pytest.raises(CheckpointError) as info:
        fxlora.load_lora(gm, path)
    assert text in str(info.value), str(info.value)
    assert _unchanged(gm, before)


def test_metadata_of_another_tool_is_not_fxloras_to_check(tmp_path):
    gm = _proj_gm()
    fxlora.load_lora(gm, _with_metadata(gm, tmp_path / "a.safetensors", {"format": "pt", "note": "anything"}))


# -- permissions -------------------------------------------------------------------------------------


def test_saved_files_get_the_modes_a_user_expects(tmp_path):
    gm = _proj_gm()
    old = os.umask(0o022)
    try:
        fxlora.save_lora(gm, tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o644
    os.chmod(tmp_path / "new.safetensors", 0o600)
    fxlora.save_lora(gm, tmp_path / "new.safetensors")
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o600
    os.chmod(tmp_path / "new.safetensors", 0o444)
    data = (tmp_path / "new.safetensors").read_bytes()
    with torch.no_grad():
        gm.get_parameter("blocks.0.proj.lora_B").add_(1)
    with pytest.raises(CheckpointError, match="read-only"):
        fxlora.save_lora(gm, tmp_path / "new.safetensors")
    assert (tmp_path / "new.safetensors").read_bytes() == data


# -- killed savers, concurrent readers ----------------------------------------------------------------


@pytest.mark.parametrize("step, expected", [("file-written", 1.0), ("file-replaced", 2.0)])
def test_a_save_killed_between_its_steps_leaves_the_old_or_the_new_file(step, expected, tmp_path):
    model, (one, two) = two_versions()
    path = tmp_path / "adapter.safetensors"
    fxlora.save_lora(one, path)
    pid = fork(lambda: (die_at(step), fxlora.save_lora(two, path)))
    assert wait(pid) == -9  # it died at that step
    fresh = fxlora.rewrite(model, [Rule("*", r=64, alpha=int(expected))])
    fxlora.load_lora(fresh, path)
    assert version_of(fresh) == expected
    fxlora.save_lora(two, path)  # the next save removes what the dead one left beside the file
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_killing_save_lora_at_random_moments_never_tears_the_file(tmp_path):
    model, (one, two) = two_versions()
    path = tmp_path / "adapter.safetensors"
    fresh = {1.0: fxlora.rewrite(model, [Rule("*", r=64, alpha=1)]), 2.0: fxlora.rewrite(model, [Rule("*", r=64, alpha=2)])}

    def on_disk():
        tensors, _ = fxlora.state.read_lora_file(path)  # one version of the file, whole
        version = float(tensors["0.lora_A"].flatten()[0])
        fxlora.load_lora(fresh[version], path)  # its metadata (alpha) and its tensors agree
        assert version_of(fresh[version]) == version
        return version

    kills, changed = kill_loop({1.0: lambda: fxlora.save_lora(one, path), 2.0: lambda: fxlora.save_lora(two, path)}, on_disk)
    print(f"kill loop: {kills} kills, {changed} of them after a switch")
    fxlora.save_lora(one, path)
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # what the killed savers left is gone


def test_readers_during_saves_get_the_old_or_the_new_adapter(tmp_path):
    path = tmp_path / "adapter.safetensors"
    # a refusal: the other version, whose metadata says the other alpha
    loads, refused = read_while_writing(lambda gm: fxlora.save_lora(gm, path), lambda gm: fxlora.load_lora(gm, path),
                                        ("alpha",))
    assert loads > 10 and refused > 10, (loads, refused)
    print(f"reader/writer: {loads} loads, {refused} refusals")


def test_a_peft_folder_given_to_load_lora_says_which_function_reads_it(tmp_path):
    gm = _proj_gm()
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a PEFT adapter folder; load it with fxlora.load_peft_adapter"):
        fxlora.load_lora(gm, tmp_path)


# -- all or nothing when a copy fails midway, inference tensors, served slots -----------------------


def _copy_that_writes_then_fails(monkeypatch, fail_at):
    """``copy_into`` that writes its ``fail_at``-th target and then raises, as an inference tensor's
    version-counter check does after the kernel ran."""
    real, calls = fxlora.state.copy_into, []

    def copy_into(target, value):
        calls.append(target)
        real(target, value)
        if len(calls) == fail_at:
            raise RuntimeError("the copy ran, then failed")

    monkeypatch.setattr(fxlora.state, "copy_into", copy_into)
    return calls


@pytest.mark.parametrize("fail_at", [1, 3, 5])
def test_a_copy_that_writes_then_fails_is_undone_with_every_earlier_one(fail_at, monkeypatch):
    gm = _proj_gm()
    bias = gm.get_parameter("blocks.1.proj.bias")
    before = _snapshot(gm)
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items()}
    sd["blocks.1.proj.bias"] = torch.randn_like(bias)  # a bias: given storage of its own, then written
    calls = _copy_that_writes_then_fails(monkeypatch, fail_at)
    with pytest.raises(CheckpointError, match="the copy ran, then failed.*nothing was loaded"):
        fxlora.load_lora_state_dict(gm, sd)
    assert len(calls) == fail_at
    assert _unchanged(gm, before)
    assert gm.get_parameter("blocks.1.proj.bias") is bias  # the original parameter is back


def test_a_model_built_under_inference_mode_is_refused_before_any_copy():
    with torch.inference_mode():
        gm = fxlora.rewrite(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), [Rule("*", r=2, alpha=2)])
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    sd = {k: torch.randn_like(v) for k, v in before.items()}
    with pytest.raises(CheckpointError, match=r"'0.lora_A'.*inference tensors.*torch.inference_mode\(\)"):
        fxlora.load_lora_state_dict(gm, sd)
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(gm).items())
    with torch.inference_mode():  # where the message says it works
        fxlora.load_lora_state_dict(gm, sd)
    assert all(torch.equal(sd[k], v) for k, v in fxlora.lora_state_dict(gm).items())


def _served():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.proj", r=2, alpha=2)], adapter="a")
    fxlora.add_adapter(gm, [Rule("blocks.*.proj", r=3, alpha=3)], "b")
    randomize_lora(gm, std=0.3)
    return fxlora.serve(gm)


@pytest.mark.parametrize("fail", ["bias", "slot"])
def test_a_served_slot_is_put_back_when_any_later_write_fails(fail, monkeypatch):
    server = _served()
    before = _snapshot(server)
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(server, adapter="b").items()}
    sd["blocks.0.proj.bias"] = torch.randn_like(server.get_parameter("blocks.0.proj.bias"))
    if fail == "bias":  # the slot is written, then the bias copy fails
        _copy_that_writes_then_fails(monkeypatch, 1)
    else:  # the slot's writer dies halfway
        real = fxlora.state.write_slot

        def write_slot(gm, adapter, tensors):
            if failed:  # the rollback's write goes through
                return real(gm, adapter, tensors)
            failed.append(True)
            real(gm, adapter, dict(list(tensors.items())[:1]))
            raise RuntimeError("the copy ran, then failed")

        failed = []

        monkeypatch.setattr(fxlora.state, "write_slot", write_slot)
    with pytest.raises(CheckpointError, match="the copy ran, then failed.*nothing was loaded"):
        fxlora.load_lora_state_dict(server, sd, adapter="b")
    monkeypatch.undo()
    assert _unchanged(server, before)
    fxlora.load_lora_state_dict(server, sd, adapter="b")  # and without the failure it loads
    assert all(torch.equal(sd[k], v) for k, v in fxlora.lora_state_dict(server, adapter="b").items())


# -- keys -------------------------------------------------------------------------------------------


def test_two_keys_for_one_parameter_are_refused_naming_both(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, [Rule("blocks.*.proj", r=2, alpha=2)])
    fxlora.add_adapter(gm, [Rule("blocks.*.proj", r=2, alpha=2)], "b")
    randomize_lora(gm)
    before = _snapshot(gm)
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm, adapter="b").items()}
    sd["blocks.0.proj.lora_A_b"] = torch.randn_like(sd["blocks.0.proj.lora_A"])  # the parameter's own name
    for strict in (True, False):
        with pytest.raises(CheckpointError, match="'blocks.0.proj.lora_A' and 'blocks.0.proj.lora_A_b' both name"):
            fxlora.load_lora_state_dict(gm, sd, adapter="b", strict=strict)
        assert _unchanged(gm, before)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(files.safetensors_bytes(sd, {}))
    with pytest.raises(CheckpointError, match="both name the parameter 'blocks.0.proj.lora_A_b'"):
        fxlora.load_lora(gm, path, adapter="b")
    assert _unchanged(gm, before)


def test_a_nested_tensor_is_refused_as_nested():
    gm = _proj_gm()
    before = _snapshot(gm)
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items()}
    a = sd["blocks.0.proj.lora_A"]
    sd["blocks.0.proj.lora_A"] = torch.nested.nested_tensor([a, a[:1]])
    with pytest.raises(CheckpointError, match="'blocks.0.proj.lora_A' is a nested tensor") as info:
        fxlora.load_lora_state_dict(gm, sd)
    assert "torch.strided" not in str(info.value)
    assert _unchanged(gm, before)


@pytest.mark.parametrize("through", ["state_dict", "file"])
def test_strict_false_loads_the_subset_all_or_nothing_and_reports_the_rest(through, tmp_path):
    gm = _proj_gm()
    names = list(fxlora.lora_state_dict(gm))
    keep = names[:2]
    sd = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items() if k in keep}
    sd["blocks.0.proj.lora_C"] = torch.zeros(2)  # unknown

    def load(state):
        if through == "state_dict":
            return fxlora.load_lora_state_dict(gm, state, strict=False)
        path = tmp_path / "subset.safetensors"
        path.write_bytes(files.safetensors_bytes(state, {}))
        return fxlora.load_lora(gm, path, strict=False)

    before = _snapshot(gm)
    result = load(sd)
    assert type(result).__name__ == "_IncompatibleKeys"
    assert sorted(result.missing_keys) == sorted(names[2:])
    assert result.unexpected_keys == ["blocks.0.proj.lora_C"]
    got = fxlora.lora_state_dict(gm)
    assert all(torch.equal(got[k], sd[k]) for k in keep)  # the subset loaded
    assert all(torch.equal(got[k], before[k]) for k in names[2:])  # the rest untouched
    loaded = _snapshot(gm)
    bad = {k: torch.randn_like(v) for k, v in sd.items()}
    bad[keep[1]] = torch.full_like(sd[keep[1]], float("nan"))  # one bad tensor in the subset
    with pytest.raises(CheckpointError, match=f"'{keep[1]}' holds NaN"):
        load(bad)
    assert _unchanged(gm, loaded)  # nothing of the subset loaded, not even the good key


def test_a_tied_bias_stays_tied_when_it_is_loaded_or_trained():
    class TiedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.bias = self.a.bias

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = TiedBias()
    x = torch.randn(3, 4)
    gm = fxlora.rewrite(model, [fxlora.Rule("a", r=2, alpha=2), fxlora.Rule("b", r=2, alpha=2)])
    sd = fxlora.lora_state_dict(gm, bias="all")
    assert "a.bias" in sd or "b.bias" in sd
    key = "a.bias" if "a.bias" in sd else "b.bias"
    fxlora.load_lora_state_dict(gm, {**sd, key: sd[key] + 1})
    assert gm.get_submodule("a").bias is gm.get_submodule("b").bias
    ref = TiedBias()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.a.bias.add_(1)  # one tensor, both uses
        torch.testing.assert_close(gm(x), ref(x))
    assert torch.equal(model.a.bias, sd[key]) and model.b.bias is model.a.bias  # the model is untouched
    gm2 = fxlora.rewrite(model, [fxlora.Rule("a", r=2, alpha=2), fxlora.Rule("b", r=2, alpha=2)])
    fxlora.mark_only_lora_as_trainable(gm2, bias="all")  # the trained bias gets its own storage, still one tensor
    assert gm2.get_submodule("a").bias is gm2.get_submodule("b").bias and gm2.get_submodule("a").bias.requires_grad
