"""Benchmark results files: one JSON document per run, with what produced it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch


def _launcher() -> str:
    """``python``, or the torchrun command line that started this process (torchrun sets these)."""
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return "python"
    nodes = int(os.environ.get("WORLD_SIZE", 1)) // max(int(os.environ["LOCAL_WORLD_SIZE"]), 1)
    return f"torchrun --nproc-per-node={os.environ['LOCAL_WORLD_SIZE']}" + (f" --nnodes={nodes}" if nodes > 1 else "")


def environment(script: str | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and with what a benchmark ran: ``script`` (the path of its module under ``fxlora.tools``,
    default the running program) with ``argv`` (default the program's arguments)."""
    script = Path(script or sys.argv[0]).stem
    argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([_launcher(), f"-m fxlora.tools.{script}", *argv]),
        "argv": argv,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        "python": platform.python_version(),
    }


def write(
    path: str | os.PathLike[str] | None,
    payload: dict[str, Any],
    *,
    script: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Write ``payload`` with :func:`environment` (of ``script`` run with ``argv``) as JSON to ``path``
    (nothing when ``path`` is None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(script, argv), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
