"""Files and folders fxlora reads and writes, crash-consistently.

Writing
    :func:`write_file` writes a complete temporary file beside the target (created with mode
    ``0o666``, so the kernel applies the umask exactly as for any new file; an existing target's mode
    is copied onto it), ``fsync``\\s it and renames it over the target: a reader or a crash sees the old
    file or the new one, never a torn one.

    :func:`write_folder` replaces several files of a folder *together* (a PEFT adapter's config and
    weights): it builds a complete new version of the folder beside it (the folder's other files,
    such as ``README.md`` or tokenizer files, are hard-linked or copied into it), then exchanges the two
    directories in one ``renameat2(RENAME_EXCHANGE)`` call (Linux >= 3.15, through ``ctypes``) and
    removes the old version.  Nothing is ever staged *inside* the folder.  Where the exchange is not
    available (another OS, or a filesystem that refuses it) the switch is two renames; a crash between
    them leaves the folder absent and its previous version complete beside it, and the next save
    puts it back before doing anything else (documented in docs/reliability.md).

    A target whose mode denies its owner write permission (``chmod a-w``) is *read-only* and is
    refused with :class:`~fxlora.errors.CheckpointError`, even for root, which the kernel would let
    through: the user said not to replace it.

    A process killed while saving may leave its temporary file or folder *beside* the target, named
    ``.<name>.fxlora-<pid>-<token>``; the next save to the same target removes those whose process is
    gone.

Reading
    :func:`read_file` reads a file whole through one open handle and checks it did not change while
    being read; the bytes are then parsed in memory, so the metadata and the tensors of a checkpoint
    always come from one version of the file.  :func:`read_folder` opens the folder once and reads
    every file relative to that handle, so the files come from one version of the folder (a switch in
    the middle is noticed, and the read is repeated).  :func:`sniff` tells a file's format from its
    first bytes, never from its name.

Tests make a saving process die at a named point with :data:`STEP_HOOK` (see :data:`STEPS`).
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import math
import os
import platform
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = [
    "as_path",
    "STEPS",
    "STEP_HOOK",
    "read_file",
    "read_folder",
    "write_file",
    "write_folder",
    "sniff",
    "parse_json",
    "json_depth_path",
    "safetensors_bytes",
    "parse_safetensors",
    "parse_torch_save",
    "parse_tensor_file",
    "MAX_JSON_DEPTH",
]

#: The points between the steps of a save, in order; :data:`STEP_HOOK` is called with each.
STEPS = (
    "file-written",  # the temporary file is complete and synced; the target is untouched
    "file-replaced",  # the rename is done
    "folder-staged",  # the new version of the folder is complete beside it; the folder is untouched
    "folder-half-switched",  # fallback only: the folder was renamed away, the new one not yet in place
    "folder-switched",  # the new version is in place; the old one is beside it
    "folder-cleaned",  # the old version is removed
)

#: Called with each name in :data:`STEPS` as a save passes it (tests use it to kill the saver there).
STEP_HOOK: Callable[[str], None] | None = None

#: JSON read from files may nest at most this deep (config objects nest 2 or 3 levels).
MAX_JSON_DEPTH = 16
_SCAN_DEPTH = 200  # beyond this the text is refused before the parser (which recurses) sees it
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header

_TAG = ".fxlora-"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _step(name: str) -> None:
    assert name in STEPS, name
    hook = STEP_HOOK
    if hook is not None:
        hook(name)


def as_path(path: Any, what: str) -> Path:
    """``path`` as a Path, or a CheckpointError for a value that is not a path."""
    try:
        return Path(os.fspath(path))
    except TypeError:
        raise CheckpointError(f"the {what} path must be a str or os.PathLike, got {type(path).__name__}.") from None


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


# --------------------------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------------------------- #


def _read_fd(fd: int, path: Path | str, what: str) -> bytes:
    """Everything in the open regular file ``fd`` (closed here); refused if it changed meanwhile."""
    try:
        before = os.fstat(fd)
        if stat.S_ISDIR(before.st_mode):
            raise CheckpointError(f"'{path}' is a folder, not a {what} file.")
        if not stat.S_ISREG(before.st_mode):
            raise CheckpointError(f"'{path}' is not a regular file (a device, pipe or socket); fxlora reads {what} files only.")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            chunks.append(chunk)
        after = os.fstat(fd)
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {_reason(e)}. Nothing was loaded.") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        raise CheckpointError(
            f"'{path}' changed while it was being read (another program is writing it in place); read it again "
            "when the writer is done. Nothing was loaded."
        )
    return data


def read_file(path: str | os.PathLike[str], *, what: str = "checkpoint") -> bytes:
    """The bytes of ``path``, read whole from one open handle (a :class:`CheckpointError` says why not)."""
    p = as_path(path, what)
    try:
        fd = os.open(p, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)  # O_NONBLOCK: a FIFO must not hang us
    except FileNotFoundError:
        raise CheckpointError(f"no {what} at '{p}'.") from None
    except OSError as e:
        raise CheckpointError(f"cannot open '{p}': {_reason(e)}. Nothing was loaded.") from None
    return _read_fd(fd, p, what)


def read_folder(folder: str | os.PathLike[str], names: Iterable[str], *, what: str) -> dict[str, bytes | None]:
    """``{name: bytes}`` for each of ``names`` in ``folder`` (None for a file that is absent), all from one
    version of the folder: the folder is opened once and each file is opened relative to it.  If the
    folder is switched to a new version while a file is being looked up, the read starts over."""
    root = as_path(folder, what)
    names = list(names)
    for _ in range(8):
        try:
            dfd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except FileNotFoundError:
            hint = _interrupted_hint(root)
            raise CheckpointError(f"'{root}' is not a {what} folder: it does not exist.{hint}") from None
        except NotADirectoryError:
            raise CheckpointError(f"'{root}' is a file; a {what} is a folder.") from None
        except OSError as e:
            raise CheckpointError(f"cannot open the folder '{root}': {_reason(e)}.") from None
        try:
            found: dict[str, bytes | None] = {}
            switched = False
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dfd)
                except FileNotFoundError:
                    found[name] = None
                    switched = switched or _replaced(root, dfd)
                    continue
                except OSError as e:
                    raise CheckpointError(f"cannot open '{root / name}': {_reason(e)}.") from None
                found[name] = _read_fd(fd, root / name, what)
            if not switched:
                return found
        finally:
            os.close(dfd)
    raise CheckpointError(f"'{root}' kept changing while it was being read (is another process saving to it in a loop?).")


def _replaced(root: Path, dfd: int) -> bool:
    """Whether the folder at ``root`` is no longer the directory open as ``dfd``."""
    try:
        now, then = os.stat(root), os.fstat(dfd)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


#: No file of the formats fxlora reads is shorter: a safetensors file is an 8-byte header length and at
#: least ``{}``; a zip (``torch.save``) ends with a 22-byte directory record; a ``torch.save`` pickle
#: starts with a magic number that alone is longer.
MIN_FILE_BYTES = 10


def sniff(data: bytes) -> str:
    """``"safetensors"``, ``"zip"`` (``torch.save``'s format), ``"pickle"`` (legacy ``torch.save`` or
    ``pickle.dump``), ``"empty"``, ``"truncated"`` (shorter than any file of those formats) or
    ``"unknown"``, from the first bytes of ``data``.

    A pickle starts with PROTO (``0x80``) and its protocol (2 to 5); so does a safetensors file whose
    header is 640, 896, 1152 or 1408 bytes long (a little-endian u64: ``80 02 00 00 00 00 00 00``).
    The byte after PROTO tells them apart: a pickle's next opcode is never ``0x00``, while a header
    length below 2**16 has zero bytes 2 to 7 (and a safetensors file has ``{`` at byte 8)."""
    if not data:
        return "empty"
    if len(data) >= 10 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") >= 2:
        return "safetensors"  # a u64 header length, then the JSON header (perhaps truncated: parse says)
    if len(data) < MIN_FILE_BYTES:
        return "truncated"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    if data[0] == 0x80 and 2 <= data[1] <= 5 and data[2] != 0:
        return "pickle"
    return "unknown"


def pickle_truncated(data: bytes, pickles: int = 5) -> bool:
    """Whether the pickle stream in ``data`` ends before one of its first ``pickles`` pickles is complete
    (a legacy ``torch.save`` file is five pickles, then raw storage bytes).  Read with
    :func:`pickletools.genops`, which decodes opcodes without running any; linear in the data."""
    import pickletools

    stream = io.BytesIO(data)
    for _ in range(pickles):
        if stream.tell() >= len(data):
            return False
        try:
            for _op in pickletools.genops(stream):
                pass
        except Exception:  # noqa: BLE001 - genops raises ValueError and others on bad input
            return stream.tell() >= len(data)  # ran out of bytes: truncated; else corrupted
    return False


# --------------------------------------------------------------------------------------------- #
# formats
# --------------------------------------------------------------------------------------------- #


class _Refused(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number fxlora accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} overflows a float")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _scan_depth(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects at most ``limit`` deep (strings skipped)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def json_depth_path(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The dotted path of the first value nested deeper than ``limit`` containers, or None."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth + 1 > limit:
                return path or "(top level)"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, child in items:
                stack.append((child, f"{path}.{k}" if path else str(k), depth + 1))
    return None


def parse_json(data: bytes | str, *, source: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON: UTF-8, no NaN/Infinity, no number that overflows, no key twice in one
    object, at most ``max_depth`` nested containers (the error names the field that goes deeper)."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{source} is not UTF-8 text ({e}).") from None
    if not _scan_depth(text, _SCAN_DEPTH):
        raise CheckpointError(f"{source} nests JSON more than {_SCAN_DEPTH} levels deep (at most {max_depth}).")
    try:
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_no_duplicates
        )
    except _Refused as e:
        raise CheckpointError(f"{source} is not valid for fxlora: {e}.") from None
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{source} is not valid JSON ({e}).") from None
    deep = json_depth_path(value, max_depth)
    if deep is not None:
        raise CheckpointError(f"{source}: field '{deep}' is nested more than {max_depth} levels deep.")
    return value


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """A safetensors file, in memory (tensors must be dense, contiguous and on the CPU)."""
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def parse_safetensors(data: bytes, *, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file held in ``data`` (one version: both come from these
    bytes).  The header is checked before the tensors are built."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 10:
        raise CheckpointError(f"{source} is too short to be a safetensors file ({len(data)} bytes); it may be truncated.")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > _MAX_HEADER:
        raise CheckpointError(
            f"{source} is not a readable safetensors file: its header claims {n} bytes, the file holds "
            f"{len(data) - 8} after the length; it may be truncated or corrupted."
        )
    header = parse_json(data[8 : 8 + n], source=f"{source} (safetensors header)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a readable safetensors file: its header is not a JSON object.")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{source}: the safetensors metadata (__metadata__) must map strings to strings.")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise CheckpointError(
            f"{source} is not a readable safetensors file ({e}); it may be truncated or corrupted."
        ) from None
    return {k: tensors[k] for k in sorted(tensors)}, dict(metadata)  # sorted, as safetensors lists them


def parse_tensor_file(data: bytes, *, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` from the bytes of a checkpoint, the reader chosen by :func:`sniff`:
    safetensors (with its metadata), or ``torch.save`` (zip or legacy pickle, ``weights_only=True``,
    no metadata).  The values are not checked here (the loaders stage and check them)."""
    from collections.abc import Mapping

    kind = sniff(data)
    if kind == "safetensors":
        return parse_safetensors(data, source=source)
    if kind in ("zip", "pickle"):
        obj = parse_torch_save(data, source=source)
        if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
            raise CheckpointError(
                f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors). "
                "Nothing was loaded."
            )
        return dict(obj), {}
    if kind == "empty":
        raise CheckpointError(f"{source} is empty (0 bytes); it was not written completely. Nothing was loaded.")
    if kind == "truncated":
        raise CheckpointError(
            f"{source} is truncated (only {len(data)} bytes, shorter than any safetensors or torch.save file) or is "
            "not a checkpoint at all; save it again. Nothing was loaded."
        )
    raise CheckpointError(
        f"{source} is neither a safetensors file nor a torch.save file (it starts with {bytes(data[:8])!r}); it may "
        "be corrupted. Nothing was loaded."
    )


def parse_torch_save(data: bytes, *, source: str) -> Any:
    """What ``torch.save`` wrote into ``data``, read with ``weights_only=True``: tensors and plain
    containers only, so a malicious pickle cannot run code."""
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if pickle_truncated(data):  # a cut-off name reads as an unknown global: say what happened
            raise CheckpointError(
                f"{source} is a truncated torch.save file (its pickle ends after {len(data)} bytes); it was not "
                "written completely. Save it again. Nothing was loaded."
            ) from None
        raise CheckpointError(
            f"{source} is a pickle that holds more than tensors (it would run code or build objects), so fxlora "
            f"refuses to unpickle it ({first}). Nothing was loaded."
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on corrupt input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{source} is not a readable torch.save file ({type(e).__name__}: {first}); it may be truncated or "
            "corrupted. Nothing was loaded."
        ) from None


# --------------------------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------------------------- #


def _resolve(path: Path) -> Path:
    """The path a write must replace: a symbolic link is followed, so the link stays and its target
    gets the new content."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def _stat(path: Path | str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _read_only(path: Path, st: os.stat_result) -> bool:
    return not st.st_mode & stat.S_IWUSR or not os.access(path, os.W_OK)


def _refuse_read_only(path: Path, st: os.stat_result, what: str) -> None:
    if _read_only(path, st):
        raise CheckpointError(
            f"'{path}' is read-only (mode {stat.S_IMODE(st.st_mode):04o}), so fxlora does not replace it. Make it "
            f"writable (chmod u+w '{path}') or save the {what} elsewhere. Nothing was written."
        )


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _leftovers(target: Path) -> list[tuple[Path, int]]:
    """Temporary files and folders that savers of ``target`` left beside it: (path, pid)."""
    prefix = f".{target.name}{_TAG}"
    found = []
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return []
    for entry in entries:
        if entry.startswith(prefix):
            pid = entry[len(prefix) :].split("-", 1)[0]
            if pid.isdigit():
                found.append((target.parent / entry, int(pid)))
    return found


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _tidy(target: Path) -> None:
    """Remove what dead savers of ``target`` left beside it; if the folder is missing because a fallback
    switch was interrupted, put its previous version back first."""
    leftovers = [(p, pid) for p, pid in _leftovers(target) if not _alive(pid)]
    if not os.path.lexists(target):
        olds = [p for p, _ in leftovers if p.name.endswith("-old")]
        if olds:
            try:
                os.rename(max(olds, key=lambda p: p.stat().st_mtime_ns), target)
            except OSError:
                return  # another process is repairing it
            leftovers = [(p, pid) for p, pid in leftovers if p.exists()]
    for p, _ in leftovers:
        try:
            _remove(p)
        except OSError:
            pass


def _interrupted_hint(target: Path) -> str:
    olds = [p for p, _ in _leftovers(target) if p.name.endswith("-old")]
    if not olds:
        return ""
    return (
        f" A save was interrupted while switching versions: the previous version is complete at '{olds[0]}'; "
        "the next save puts it back, or rename it yourself."
    )


def _temp_name(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}{_TAG}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode_from: os.stat_result | None) -> None:
    """Create ``path`` (it must not exist) holding ``data``: mode 0o666 less the umask, or
    ``mode_from``'s mode (and owner, where permitted) when it replaces that file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mode_from is not None:
            os.fchmod(fd, stat.S_IMODE(mode_from.st_mode))
            if (mode_from.st_uid, mode_from.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.fchown(fd, mode_from.st_uid, mode_from.st_gid)
                except OSError:
                    pass  # not permitted: the file becomes the writer's, as any rewrite would
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data: bytes, *, what: str = "checkpoint") -> Path:
    """Replace (or create) the file ``path`` with ``data`` atomically; see the module docstring for
    modes, read-only targets and leftovers.  Returns the path written (a symlink's target)."""
    target = _resolve(as_path(path, what))
    st = _stat(target)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"'{target}' is a folder; give a file name for the {what}. Nothing was written.")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"'{target}' is not a regular file; fxlora replaces regular files only. Nothing was written.")
        _refuse_read_only(target, st, what)
    parent = target.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write '{target}': the folder '{parent}' does not exist. Nothing was written.")
    _tidy(target)
    tmp = _temp_name(target)
    try:
        _write_new(tmp, data, st)
        _step("file-written")
        os.replace(tmp, target)
        _step("file-replaced")
    except OSError as e:
        _discard(tmp)
        raise CheckpointError(f"cannot write '{target}': {_reason(e)}. Nothing was written.") from None
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(parent)
    return target


def _discard(path: Path) -> None:
    try:
        _remove(path)
    except OSError:
        pass


# -- folders ------------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}


def _find_renameat2() -> Callable[[bytes, bytes], int] | None:
    """``renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)`` through ctypes, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    number = _SYSCALL_RENAMEAT2.get(platform.machine())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:  # glibc < 2.28 on an architecture not listed
        return None
    syscall.restype = ctypes.c_long
    return lambda a, b: syscall(
        ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a), ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(b), ctypes.c_uint(_RENAME_EXCHANGE),
    )


#: The exchange primitive; None where it does not exist (tests set it to None to exercise the fallback).
RENAME_EXCHANGE: Callable[[bytes, bytes], int] | None = _find_renameat2()


def _switch(staging: Path, folder: Path) -> Path:
    """Put ``staging`` at ``folder``'s name; return where the previous version now is (to remove)."""
    exchange = RENAME_EXCHANGE
    if exchange is not None:
        if exchange(os.fsencode(staging), os.fsencode(folder)) == 0:
            return staging
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(folder))
    old = _temp_name(folder, "-old")  # fallback: two renames; _tidy repairs a crash between them
    os.rename(folder, old)
    _step("folder-half-switched")
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    return old


def _copy_entries(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (or copy) every entry of ``src`` into the empty folder ``dst`` but ``skip``."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    for entry in os.scandir(src):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry.path, str(target))


def write_folder(folder: str | os.PathLike[str], files: dict[str, bytes], *, what: str) -> Path:
    """Write ``files`` (name -> bytes) into ``folder`` so that they all change together: readers and
    crashes see the previous version of the folder or the new one, with its other files kept."""
    target = Path(os.path.abspath(_resolve(as_path(folder, what))))
    cwd = Path(os.getcwd())
    if cwd == target or target in cwd.parents:
        raise CheckpointError(
            f"'{target}' is (or holds) the current working directory; fxlora replaces a folder by exchanging it for a "
            "new version and removing the old one, which would leave this process in a deleted directory. Save to "
            "another folder. Nothing was written."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder '{target.parent}': {_reason(e)}. Nothing was written.") from None
    _tidy(target)
    st = _stat(target)
    old_modes: dict[str, os.stat_result] = {}
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"'{target}' is a file; a {what} is a folder. Nothing was written.")
        _refuse_read_only(target, st, what)
        for name in files:
            fst = _stat(target / name)
            if fst is None:
                continue
            if not stat.S_ISREG(fst.st_mode):
                raise CheckpointError(f"'{target / name}' is not a regular file, so fxlora does not replace it. Nothing was written.")
            _refuse_read_only(target / name, fst, what)
            old_modes[name] = fst
    staging = _temp_name(target)
    switched = False
    try:
        os.mkdir(staging, 0o777)  # the umask applies, as for any new folder
        if st is not None:
            _copy_entries(target, staging, set(files))
        for name, data in files.items():
            _write_new(staging / name, data, old_modes.get(name))
        if st is not None:
            os.chmod(staging, stat.S_IMODE(st.st_mode))
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.chown(staging, st.st_uid, st.st_gid)
                except OSError:
                    pass
        _fsync_dir(staging)
        _step("folder-staged")
        if st is None:
            try:
                os.rename(staging, target)  # fails if the folder appeared meanwhile: never merged into
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise CheckpointError(
                    f"another process created '{target}' while this save was running; save again. Nothing was written."
                ) from None
            switched = True
            _step("folder-switched")
        else:
            old = _switch(staging, target)
            switched = True
            _step("folder-switched")
            _discard(old)  # a failure here leaves it beside the folder, for a later save to remove
            _step("folder-cleaned")
    except OSError as e:
        if not switched:
            _discard(staging)
        raise CheckpointError(f"cannot write the {what} '{target}': {_reason(e)}. Nothing was written.") from None
    except BaseException:
        if not switched:
            _discard(staging)
        raise
    _fsync_dir(target.parent)
    return target
