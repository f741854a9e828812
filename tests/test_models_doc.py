"""docs/models.md stays true: its Python blocks run in order, in one namespace, in an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_models_page_python_blocks_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace = {"__name__": "docs_models"}
        blocks = [b for kind, b in re.findall(r"```(\w+)\n(.*?)```", PAGE.read_text(), flags=re.S) if kind == "python"]
        assert len(blocks) >= 5
        for body in blocks:
            exec(compile(body, "docs/models.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "mistral.onnx").exists()
