"""fxlora.files: formats told by their bytes, atomic files and folders, modes, read-only targets,
untrusted JSON, leftovers of killed savers."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import stat

import pytest
import torch
from fxlora import CheckpointError, files

from processes import die_at, fork, wait


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- formats ----------------------------------------------------------------------------------------


def _torch_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def test_formats_are_told_by_their_bytes():
    sd = {"a": torch.ones(2, 3)}
    st = files.safetensors_bytes(sd, {"format": "pt"})
    assert files.sniff(st) == "safetensors"
    assert files.sniff(_torch_bytes(sd)) == "zip"
    assert files.sniff(_torch_bytes(sd, _use_new_zipfile_serialization=False)) == "pickle"
    assert files.sniff(pickle.dumps(sd)) == "pickle"
    assert files.sniff(b"") == "empty"
    assert files.sniff(b"hello world, not a checkpoint") == "unknown"
    for data in (st, _torch_bytes(sd), _torch_bytes(sd, _use_new_zipfile_serialization=False)):
        tensors, _ = files.parse_tensor_file(data, source="x")
        assert torch.equal(tensors["a"], sd["a"])


def _safetensors_with_header(length: int) -> bytes:
    """A real safetensors file whose header is ``length`` bytes (padded through its metadata)."""
    sd = {"a.lora_A": torch.ones(2, 3)}
    for pad in range(length):
        data = files.safetensors_bytes(sd, {"format": "pt", "pad": "x" * pad})
        if int.from_bytes(data[:8], "little") == length:
            return data
    raise AssertionError(f"no padding gives a {length}-byte header")


def test_a_truncated_file_is_called_truncated_never_a_malicious_pickle():
    # 640, 896, 1152 and 1408 as little-endian u64 start with 0x80 0x02..0x05, as a pickle does
    sd = {"a.lora_A": torch.ones(2, 3)}
    saves = {f"safetensors/{n}": _safetensors_with_header(n) for n in (640, 896, 1152, 1408)}
    saves["zip"] = _torch_bytes(sd)
    saves["legacy"] = _torch_bytes(sd, _use_new_zipfile_serialization=False)
    saves["pickle"] = pickle.dumps(sd, protocol=2)
    for name, data in saves.items():
        assert files.sniff(data) != "unknown", name
        for n in range(1, len(data)):
            with pytest.raises(CheckpointError) as e:
                files.parse_tensor_file(data[:n], source="'x'")
            message = str(e.value)
            assert "run code" not in message and "malicious" not in message, (name, n, message)
            if n < files.MIN_FILE_BYTES:
                assert "truncated" in message, (name, n, message)
    assert files.sniff(saves["safetensors/640"][:9]) == "truncated"
    assert files.sniff(b"\x80\x02\x00\x00\x00\x00\x00\x00\x00\x00") == "unknown"  # not a pickle either


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_still_called_one(legacy):
    data = _torch_bytes({"x": _RunsCode()}, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="run code"):
        files.parse_tensor_file(data, source="'x'")
    with pytest.raises(CheckpointError, match="run code"):
        files.parse_tensor_file(pickle.dumps({"x": _RunsCode()}), source="'x'")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"r": NaN}', "NaN is not a number"),
        ('{"r": Infinity}', "Infinity is not a number"),
        ('{"r": 1e999}', "overflows a float"),
        ('{"r": 1, "r": 2}', "'r' appears twice"),
        ('{"r": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"a": ' + "[" * 17 + "]" * 17 + "}", "field 'a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0' is nested more than 16"),
        ("[" * 100_000, "more than 200 levels"),
        (b"\xff\xfe{}", "not UTF-8"),
        ('{"r": 1', "not valid JSON"),
    ],
)
def test_untrusted_json_is_refused_with_a_reason(text, message):
    with pytest.raises(CheckpointError) as info:
        files.parse_json(text.encode() if isinstance(text, str) else text, source="'adapter_config.json'")
    assert message in str(info.value) and "'adapter_config.json'" in str(info.value)


def test_a_header_that_claims_more_than_the_file_is_refused():
    data = bytearray(files.safetensors_bytes({"a": torch.ones(4)}, {}))
    data[:8] = (10**9).to_bytes(8, "little")
    with pytest.raises(CheckpointError, match="header claims 1000000000 bytes"):
        files.parse_safetensors(bytes(data), source="x")


# -- reading ----------------------------------------------------------------------------------------


def test_reading_a_fifo_or_a_folder_fails_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        files.read_file(fifo)  # no writer: a plain open() would block forever
    with pytest.raises(CheckpointError, match="is a folder"):
        files.read_file(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        files.read_file(tmp_path / "absent")


def test_read_folder_reads_each_file_of_one_version(tmp_path):
    files.write_folder(tmp_path / "f", {"a": b"1", "b": b"1"}, what="test")
    assert files.read_folder(tmp_path / "f", ["a", "b", "c"], what="test") == {"a": b"1", "b": b"1", "c": None}
    with pytest.raises(CheckpointError, match="is not a test folder: it does not exist"):
        files.read_folder(tmp_path / "nowhere", ["a"], what="test")


# -- writing files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_umasks_mode(tmp_path, mask, mode):
    with umask(mask):
        files.write_file(tmp_path / "a.bin", b"x")
    assert _mode(tmp_path / "a.bin") == mode


def test_a_replaced_file_keeps_its_mode_and_nothing_is_left_beside_it(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    with umask(0o077):
        files.write_file(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o640
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_read_only_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o444)
    with pytest.raises(CheckpointError, match=r"read-only \(mode 0444\).*chmod u\+w"):
        files.write_file(path, b"new")  # refused even for root, whom the kernel would let through
    assert path.read_bytes() == b"old" and _mode(path) == 0o444
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_symlink_keeps_pointing_at_the_new_content(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    files.write_file(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_bad_targets_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        files.write_file(tmp_path, b"x")
    with pytest.raises(CheckpointError, match="does not exist"):
        files.write_file(tmp_path / "no" / "a.bin", b"x")
    with pytest.raises(CheckpointError, match="must be a str or os.PathLike"):
        files.write_file(3, b"x")


def test_a_killed_savers_temporary_file_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "a.bin"
    files.write_file(path, b"old")
    pid = fork(lambda: (die_at("file-written"), files.write_file(path, b"new")))
    assert wait(pid) == -9
    assert path.read_bytes() == b"old"
    assert len(os.listdir(tmp_path)) == 2  # the dead saver's complete temporary file, beside the target
    files.write_file(path, b"newer")
    assert os.listdir(tmp_path) == ["a.bin"] and path.read_bytes() == b"newer"


# -- writing folders --------------------------------------------------------------------------------


def test_a_new_folder_and_its_files_get_the_umasks_modes(tmp_path):
    with umask(0o027):
        files.write_folder(tmp_path / "new" / "adapter", {"a": b"1"}, what="test")
    assert _mode(tmp_path / "new" / "adapter") == 0o750 and _mode(tmp_path / "new" / "adapter" / "a") == 0o640


def test_a_replaced_folder_keeps_its_other_files_and_its_modes(tmp_path):
    folder = tmp_path / "adapter"
    files.write_folder(folder, {"a": b"1", "b": b"1"}, what="test")
    (folder / "README.md").write_text("mine")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    os.chmod(folder, 0o750)
    os.chmod(folder / "a", 0o600)
    files.write_folder(folder, {"a": b"2", "b": b"2"}, what="test")
    assert sorted(os.listdir(folder)) == ["README.md", "a", "b", "tokenizer"]
    assert (folder / "a").read_bytes() == b"2" and (folder / "b").read_bytes() == b"2"
    assert (folder / "README.md").read_text() == "mine" and (folder / "tokenizer" / "vocab.json").read_text() == "{}"
    assert _mode(folder) == 0o750 and _mode(folder / "a") == 0o600
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging or old version left beside it


def test_read_only_folders_and_files_are_refused(tmp_path):
    folder = tmp_path / "adapter"
    files.write_folder(folder, {"a": b"1", "b": b"1"}, what="test")
    os.chmod(folder / "b", 0o444)
    with pytest.raises(CheckpointError, match="read-only"):
        files.write_folder(folder, {"a": b"2", "b": b"2"}, what="test")
    os.chmod(folder / "b", 0o644)
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(CheckpointError, match="read-only"):
            files.write_folder(folder, {"a": b"2", "b": b"2"}, what="test")
    finally:
        os.chmod(folder, 0o755)
    assert (folder / "a").read_bytes() == b"1" and sorted(os.listdir(tmp_path)) == ["adapter"]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        files.write_folder(tmp_path / "file", {"a": b"1"}, what="test")


def test_without_rename_exchange_the_fallback_switches_and_repairs_a_crash(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    files.write_folder(folder, {"a": b"1", "b": b"1"}, what="test")
    monkeypatch.setattr(files, "RENAME_EXCHANGE", None)
    files.write_folder(folder, {"a": b"2", "b": b"2"}, what="test")
    assert files.read_folder(folder, ["a", "b"], what="test") == {"a": b"2", "b": b"2"}
    # a crash between the fallback's two renames: the folder is absent, its last version complete beside it
    pid = fork(lambda: (die_at("folder-half-switched"), files.write_folder(folder, {"a": b"3", "b": b"3"}, what="test")))
    assert wait(pid) == -9
    assert not folder.exists()
    with pytest.raises(CheckpointError, match="previous version is complete at"):
        files.read_folder(folder, ["a"], what="test")
    files.write_folder(folder, {"a": b"4", "b": b"4"}, what="test")  # puts the old version back, then saves
    assert files.read_folder(folder, ["a", "b"], what="test") == {"a": b"4", "b": b"4"}
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.skipif(files.RENAME_EXCHANGE is None, reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_the_exchange_is_one_call(tmp_path, monkeypatch):
    calls = []
    real = files.RENAME_EXCHANGE
    monkeypatch.setattr(files, "RENAME_EXCHANGE", lambda a, b: calls.append((a, b)) or real(a, b))
    folder = tmp_path / "adapter"
    files.write_folder(folder, {"a": b"1"}, what="test")  # a new folder: one rename, no exchange
    files.write_folder(folder, {"a": b"2"}, what="test")
    assert len(calls) == 1 and calls[0][1] == os.fsencode(folder)


def test_the_working_directory_is_not_replaced(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    files.write_folder(folder, {"a": b"1"}, what="test")
    monkeypatch.chdir(folder)
    with pytest.raises(CheckpointError, match="current working directory"):
        files.write_folder(".", {"a": b"2"}, what="test")
    monkeypatch.chdir(tmp_path)
    files.write_folder("adapter", {"a": b"2"}, what="test")  # a relative path to another folder is fine
    assert (folder / "a").read_bytes() == b"2"
