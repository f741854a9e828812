"""Benchmark results files: one JSON document per run, with what produced it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"python -m fxlora.tools.{Path(sys.argv[0]).stem}", *sys.argv[1:]]),
        "argv": sys.argv[1:],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        "python": platform.python_version(),
    }


def write(path: str | os.PathLike[str] | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` with :func:`environment` as JSON to ``path`` (nothing when ``path`` is None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
