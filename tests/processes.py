"""Killed and concurrent savers for the crash-consistency tests, and two adapters to tell apart.

The saving process is a ``fork`` of the test process (it already has torch and the model, so a kill loop
costs milliseconds per iteration instead of an interpreter start).  The child runs single-threaded,
touches only small tensors, and leaves with ``os._exit``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Callable

import fxlora
import torch
from fxlora import Rule, files
from torch import nn


def fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; return its pid.  The child exits 0 when ``body`` returns, 1 when it
    raises."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            torch.set_num_threads(1)
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def die_at(step: str) -> None:
    """In the child: SIGKILL ourselves when a save reaches ``step`` (one of ``fxlora.files.STEPS``)."""

    def hook(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    files.STEP_HOOK = hook


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def wait(pid: int) -> int:
    """The child's exit status, or ``-signal`` when a signal ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def forever(*saves: Callable[[], None]) -> Callable[[], None]:
    """A child body that runs ``saves`` in turn until it is killed."""

    def body() -> None:
        while True:
            for save in saves:
                save()

    return body


class Deadline:
    """``while deadline:`` runs for ``seconds`` of wall time."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def __bool__(self) -> bool:
        return time.monotonic() < self.end


def two_versions(alphas=(1, 2)):
    """A model and two adapters of it that differ in every tensor (all 1.0, all 2.0) and in alpha, so
    that metadata or config of one version with the tensors of the other is detected."""
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    gms = []
    for value, alpha in zip((1.0, 2.0), alphas):
        gm = fxlora.rewrite(model, [Rule("*", r=64, alpha=alpha)])
        with torch.no_grad():
            for name in fxlora.lora_parameter_names(gm):
                gm.get_parameter(name).fill_(value)
        gms.append(gm)
    return model, gms


def version_of(gm) -> float:
    """1.0 or 2.0 when every LoRA tensor of ``gm`` holds that version's value; fails on a mix."""
    state = fxlora.lora_state_dict(gm)
    values = {float(v.flatten()[0]) for v in state.values()}
    assert len(values) == 1, f"tensors of two versions: {values}"
    value = values.pop()
    assert all(bool((v == value).all()) for v in state.values()), "a torn tensor"
    return value


def kill_loop(saves, current, *, seconds: float = 2.0, max_seconds: float = 6.0, seed: int = 0):
    """SIGKILL savers at random moments; after each kill ``current()`` reads what is on disk and must
    return exactly one version (1.0 or 2.0; it asserts that nothing is torn or mixed).

    ``saves`` maps 1.0 and 2.0 to functions that save that version.  Each saver is a fork that saves the
    version *not* on disk, then the other, and so on, and is killed after a random delay of up to three
    times what a forked saver takes to save once (measured here: forking a large test process takes
    longer than the save itself), so kills land before, during and after its first switch.  Runs for
    ``seconds``, longer (up to ``max_seconds``) until both versions were seen after kills.
    Returns ``(kills, kills that changed the version)``."""
    rng = random.Random(seed)
    once = 0.0
    for _ in range(2):
        start = time.perf_counter()
        assert wait(fork(saves[2.0])) == 0
        once = max(once, time.perf_counter() - start)
    window = 3 * once
    saves[1.0]()
    on_disk = current()
    assert on_disk == 1.0
    seen: set[float] = set()
    kills = changed = 0
    began = time.monotonic()
    while True:
        elapsed = time.monotonic() - began
        if elapsed > max_seconds or (elapsed > seconds and kills >= 10 and seen == {1.0, 2.0}):
            break
        other = 2.0 if on_disk == 1.0 else 1.0
        pid = fork(forever(saves[other], saves[on_disk]))
        time.sleep(rng.uniform(0.0, window))
        kill(pid)
        now = current()
        changed += now != on_disk
        on_disk = now
        seen.add(now)
        kills += 1
    assert seen == {1.0, 2.0}, f"after {kills} kills only {seen} was ever on disk"
    return kills, changed


def read_while_writing(save: Callable[[nn.Module], None], load: Callable[[nn.Module], None], refusals: tuple[str, ...],
                       seconds: float = 1.5) -> tuple[int, int]:
    """Save the two versions of :func:`two_versions` in turn from a forked writer while this process loads
    with a reader of each version's alpha, for ``seconds``; ``(loads, refusals)``.  Each load must hold one
    version whole (its metadata and tensors agree with the reader's alpha); each refusal must be a
    CheckpointError whose message holds one of ``refusals``."""
    model, (one, two) = two_versions()
    save(one)
    readers = [fxlora.rewrite(model, [Rule("*", r=64, alpha=1)]), fxlora.rewrite(model, [Rule("*", r=64, alpha=2)])]
    writer = fork(forever(lambda: save(two), lambda: save(one)))
    loads = refused = 0
    try:
        deadline = Deadline(seconds)
        while deadline:
            for alpha, reader in enumerate(readers, start=1):
                try:
                    load(reader)
                except fxlora.CheckpointError as e:
                    assert any(text in str(e) for text in refusals), e
                    refused += 1
                    continue
                assert version_of(reader) == float(alpha)  # one version's metadata and tensors, never a mix
                loads += 1
    finally:
        kill(writer)
    return loads, refused
