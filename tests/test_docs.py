"""README.md and docs/ stay true: their code blocks run, their pasted outputs are what the commands
print, their links resolve, and CI runs the test command README.md gives."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import fxlora
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in re.findall(r"```(\w+)\n(.*?)```", page.read_text(), flags=re.S) if kind == lang]


def _console_blocks():
    return [(page.name, i, body) for page in PAGES for i, body in enumerate(_blocks(page, "console"))]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's Python blocks run in order in one namespace, in an empty folder."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for body in _blocks(page, "python"):
        exec(compile(body, str(page.relative_to(ROOT)), "exec"), namespace)


def test_the_readme_workflow_writes_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (workflow,) = [b for b in _blocks(ROOT / "README.md", "python") if "fxlora.save_lora" in b]
    exec(compile(workflow, "README.md", "exec"), {"__name__": "readme"})
    for name in ("adapter.safetensors", "merged.onnx", "merged.pt2", "merged.torchscript.pt"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("page, index, body", _console_blocks(), ids=lambda v: str(v) if not isinstance(v, str) or "\n" not in v else "")
def test_console_blocks_print_what_is_pasted(page, index, body):
    command, *expected = body.rstrip("\n").split("\n")
    assert command.startswith("$ fxlora ")
    argv = [sys.executable, "-m", "fxlora.tools.cli", *shlex.split(command[len("$ fxlora "):])]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert [line.rstrip() for line in proc.stdout.rstrip("\n").split("\n")] == [line.rstrip() for line in expected]


def test_toml_blocks_are_valid_rules():
    bodies = [body for page in PAGES for body in _blocks(page, "toml")]
    assert bodies
    for body in bodies:
        rules = fxlora.rules_from_data(tomllib.loads(body), source="docs")
        assert fxlora.report(fxlora.zoo.gpt2_tiny(), rules).lora_params > 0


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"


def test_readme_is_short_and_links_every_reference_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    (quick,) = [b for b in _blocks(ROOT / "README.md", "bash") if "fxlora demo" in b]
    lines = quick.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("&& fxlora demo")
    test_command = lines[1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def _test_functions(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_reliability_table_cites_exists():
    """Each row's tests column: `file.py::test_name`, then bare `test_name`s of the same file."""
    rows = [line for line in (ROOT / "docs" / "reliability.md").read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 10, "the reliability table was not found"
    cited, missing = 0, []
    for row in rows:
        tests_column = row.rstrip(" |").rpartition(" | ")[2]
        current = None
        for token in re.findall(r"`([^`]+)`", tests_column):
            file, sep, name = token.rpartition("::")
            if sep:
                current = ROOT / "tests" / file
                if not current.is_file():
                    missing.append(f"{token} (no file {file})")
                    current = None
                    continue
            if not name.startswith("test_") and name != "*":
                continue
            assert current is not None, f"{token} is cited before any file in: {row[:60]}"
            cited += 1
            if name != "*" and name not in _test_functions(current):
                missing.append(f"{current.name}::{name}")
    assert cited > 40 and not missing, missing
