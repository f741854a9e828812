"""README.md stays true: its code blocks run, its pasted outputs are what the commands print, and CI
runs the test command it gives."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import fxlora
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _blocks(lang):
    return [body for kind, body in BLOCKS if kind == lang]


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks
    for body in blocks:
        exec(compile(body, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "merged.onnx").exists()


@pytest.mark.parametrize("index", range(len(_blocks("console"))))
def test_console_blocks_print_what_is_pasted(index):
    body = _blocks("console")[index]
    command, *expected = body.rstrip("\n").split("\n")
    assert command.startswith("$ fxlora ")
    argv = [sys.executable, "-m", "fxlora.tools.cli", *shlex.split(command[len("$ fxlora "):])]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert [line.rstrip() for line in proc.stdout.rstrip("\n").split("\n")] == [line.rstrip() for line in expected]


def test_toml_blocks_are_valid_rules():
    import tomllib

    for body in _blocks("toml"):
        rules = fxlora.rules_from_data(tomllib.loads(body), source="README.md")
        assert fxlora.report(fxlora.zoo.gpt2_tiny(), rules).lora_params > 0


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    (quick,) = [b for b in _blocks("bash") if "fxlora demo" in b]
    lines = quick.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("&& fxlora demo")
    test_command = lines[1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
