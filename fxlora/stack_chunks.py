"""Calling a generated ``GraphModule.forward`` so that its own calls never straddle a CPython stack chunk.

CPython (3.11+) keeps frames in chunks of a per-thread stack and frees a chunk as soon as its first frame
returns.  A generated forward has a frame slot per graph node; called where the caller's chunk has just
room for that frame, each of the thousands of Python calls the forward makes (an operator's, a module
attribute's) maps a fresh chunk and unmaps it on return.  :func:`stack_safe` wraps a forward so that this
cannot happen, whatever the caller's stack depth (see :func:`_forward_caller` for the one case it
does not cover).  fxlora's rewritten and served modules use it.
"""

from __future__ import annotations

import functools
from typing import Any

_CHUNK_SLOTS = 2048
"""Slots of one CPython (3.11+) frame-stack chunk (16 KiB), which CPython sizes up in powers of two for a
frame that needs more, with 1000 slots to spare."""

_DIRECT_BELOW = 128
"""Generated forwards with fewer local slots are called directly (see :func:`_forward_caller`)."""


@functools.lru_cache(maxsize=None)
def _caller_of_size(slots: int) -> Any:
    names = " = ".join(f"_{i}" for i in range(slots))
    src = ("def call(fn, self, args, kwargs):\n"
           "    if fn is None:  # never: declares the locals that size the frame\n"
           f"        {names} = None\n"
           "    return fn(self, *args, **kwargs)\n")
    scope: dict[str, Any] = {}
    exec(compile(src, "<fxlora: a forward on a fresh stack chunk>", "exec"), scope)
    return scope["call"]


def _direct(fn: Any, self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(self, *args, **kwargs)


def _forward_caller(frame_slots: int) -> Any:
    """``call(fn, self, args, kwargs)``: ``fn(self, *args, **kwargs)`` from where a generated forward of
    ``frame_slots`` local slots has room to make its calls.

    CPython (3.11+) keeps frames in chunks of a per-thread stack and frees a chunk as soon as its first
    frame returns.  A graph module's generated ``forward`` has a slot per node (1621 for a 24-layer
    served GPT-2).  Where the caller's chunk has room for that frame but not for the calls it makes,
    every call (each operator's and each module attribute's Python function, thousands per forward) maps
    a chunk and unmaps it on return: a page fault or more per call, which measured 2-6x the forward's
    host time (79 against 12.5 ms on CPU; 2.3x on an H200's host), set by the caller's stack depth alone.

    The call is therefore made from a frame larger than a 16 KiB chunk and larger than the room its own
    chunk leaves behind it, so that it starts a new chunk wherever it is called from a 16 KiB chunk or
    from another such frame (a served module inside a rewritten one), with the forward's frame and 1024
    slots more behind it.  Cost: a chunk mapped per call and about ten page faults (23-30 us on a 2-core
    x86 VM).  Forwards of fewer than 128 slots (about 60 operations, a fraction of a millisecond) are called
    directly: there that cost would be a tenth of the call or more, while the worst case it prevents, a
    fault per operation, is a few hundred microseconds.  Not covered: a caller whose own
    frame above the call is larger than about 1000 slots (its chunk may then have room for all of this at
    some depths)."""
    if frame_slots < _DIRECT_BELOW:
        return _direct
    # CPython gives a frame of s slots a chunk of 2 * (s - 56) slots (for s > 1048), leaving about
    # s - 136 behind it (chunk header, frame specials): less than s, so a frame of this caller's size
    # never fits behind another one; doubled until the forward's frame and 1024 slots fit
    slots = 2 * _CHUNK_SLOTS + 56
    while slots - 136 < frame_slots + 1024:
        slots = 2 * (slots - 56) + 56
    return _caller_of_size(slots)


def stack_safe(forward: Any) -> Any:
    """``forward`` (a generated ``GraphModule.forward``), called through :func:`_forward_caller`; itself
    when its frame is too small for that to pay.  The wrapper keeps ``forward``'s name,
    signature and source (``__wrapped__``), which ``inspect`` reads; ``torch.jit.script`` cannot compile it
    (it resolves the source's names in the wrapper's globals), so folded modules, which fxlora scripts, do
    not use it."""
    code = forward.__code__
    call = _forward_caller(code.co_nlocals + code.co_stacksize)
    if call is _direct:
        return forward

    @functools.wraps(forward)
    def safe_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return call(forward, self, args, kwargs)

    # a code object of its own per graph: torch.compile keeps its compiled graphs (and its recompile limit)
    # per code object, and every graph's wrapper would otherwise share this one
    safe_forward.__code__ = safe_forward.__code__.replace()
    return safe_forward
