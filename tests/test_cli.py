"""The fxlora command: report formats, rules files, budgets, exit statuses, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import fxlora
import pytest
import torch
from fxlora.tools.cli import main, parse_budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROBERTA_RULES = """
[[rule]]
target = "encoder.layer.*.attention.self.query"
r = 8
alpha = 16

[[rule]]
target = "encoder.layer.*.attention.self.value"
r = 8
alpha = 16
"""


def _write(tmp_path, text, name="rules.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_report_roberta_base_on_meta(tmp_path, capsys):
    rules = _write(tmp_path, ROBERTA_RULES)
    assert main(["report", "fxlora.zoo:roberta_base", "--rules", rules, "--meta"]) == 0
    out = capsys.readouterr().out
    assert "LoRA parameters: 294,912" in out and "encoder.layer.11.attention.self.value" in out


def test_report_json_and_budget(tmp_path, capsys):
    rules = _write(tmp_path, ROBERTA_RULES)
    assert main(["report", "fxlora.zoo:roberta_base", "--rules", rules, "--meta", "--format", "json", "--budget", "1%"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["lora_params"] == 294_912 and len(data["sites"]) == 24
    assert main(["report", "fxlora.zoo:roberta_base", "--rules", rules, "--meta", "--budget", "250000"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "over budget: 294,912 LoRA parameters > budget 250,000"
    assert main(["report", "fxlora.zoo:roberta_base", "--rules", rules, "--meta", "--budget", "0.1%"]) == 1
    assert "0.1% of 124,055,040 base parameters" in capsys.readouterr().err


def test_rules_file_with_types_and_fused_masks(tmp_path, capsys):
    rules = _write(
        tmp_path,
        """
        [[rule]]
        target = "transformer.h.*.attn.c_attn"
        r = 4
        alpha = 32
        enable_lora = [true, false, true]

        [[rule]]
        target = "transformer.wpe"
        r = 2
        alpha = 2
        """,
    )
    assert main(["report", "fxlora.zoo:gpt2_medium", "--rules", rules, "--meta", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("site,kind") and any(line.startswith("transformer.wpe,embedding") for line in lines)
    assert any("4 x 2 slices" in line and "T-T" in line for line in lines)
    # a type rule selects every Embedding, including GPT-2's token embedding, which is tied to lm_head: the
    # tied weight is one site (one pair, applied at both uses)
    rules = _write(tmp_path, '[[rule]]\ntype = "torch.nn.Embedding"\nr = 2\nalpha = 2\n')
    assert main(["report", "fxlora.zoo:gpt2_medium", "--rules", rules, "--meta"]) == 0
    assert "transformer.wte  tied" in capsys.readouterr().out
    assert main(["report", "fxlora.zoo:roberta_base", "--rules", rules, "--meta", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sites"]) == 3


def test_no_rules_lists_candidates(capsys):
    assert main(["report", "fxlora.zoo:gpt2_tiny", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| transformer.h.0.attn.c_attn | linear" in out and "Write rules" in out


def test_paper_command(capsys):
    assert main(["paper"]) == 0
    out = capsys.readouterr().out
    for count in ("294,912", "786,432", "393,216", "4,718,592", "37,748,736"):
        assert count in out
    assert "NO" not in out


@pytest.mark.parametrize(
    "argv, text",
    [
        (["report", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["report", "fxlora.zoo:nope"], "has no 'nope'"),
        (["report", "fxlora.zoo"], "PKG.MODULE:FACTORY"),
        (["report", "fxlora.zoo:PAPER"], "not a callable"),
        (["report", "fxlora.zoo:EncoderConfig"], "not an nn.Module"),
        (["report", "fxlora.zoo:gpt2_tiny", "--rules", "/nonexistent/rules.toml"], "cannot read rules file"),
        (["report", "fxlora.zoo:gpt2_tiny", "--budget", "lots"], "--budget must be"),
        (["report", "fxlora.zoo:gpt2_tiny", "--budget", "150%"], "percentage must be in"),
        (["report", "fxlora.zoo:gpt2_tiny", "--fidelity", "bf16"], "--fidelity needs --rules and --adapter"),
        (["report", "fxlora.zoo:gpt2_tiny", "--format", "xml"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_message(argv, text, capsys):
    with pytest.raises(SystemExit) as info:
        sys.exit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


@pytest.mark.parametrize(
    "body, text",
    [
        ("[[rule]]\ntarget = 'h.*'\nr = 4\n", "missing alpha"),
        ("[[rule]]\ntarget = 'h.*'\nr = 4\nalpha = 8\nrank = 3\n", "unknown keys ['rank']"),
        ("[[rule]]\nr = 4\nalpha = 8\n", "exactly one of target"),
        ("[[rule]]\ntarget = 'x'\ntype = 'torch.nn.Linear'\nr = 4\nalpha = 8\n", "exactly one of target"),
        ("[[rule]]\ntype = 'torch.nn.NotAThing'\nr = 4\nalpha = 8\n", "cannot import type"),
        ("[[rule]]\ntype = 'math.pi'\nr = 4\nalpha = 8\n", "not an nn.Module subclass"),
        ("[[rule]]\ntarget = 'h.*'\nr = 0\nalpha = 8\n", "r must be a positive int"),
        ("[[rule]]\ntarget = 3\nr = 1\nalpha = 8\n", "target must be a string"),
        ("[[rule]]\ntarget = 'x'\nr = 'big'\nalpha = 8\n", "r must be a positive int"),
        ("[rules]\ntarget = 'x'\n", "unknown top-level keys"),
        ("rule = 3\n", "no [[rule]] tables"),
        ("", "no [[rule]] tables"),
        ("[[rule]\ntarget = ", "not valid TOML"),
        ("[[rule]]\ntarget = 'nomatch.*'\nr = 1\nalpha = 1\n", "matched no module"),
    ],
)
def test_bad_rules_files_exit_2(body, text, tmp_path, capsys):
    rules = _write(tmp_path, body)
    assert main(["report", "fxlora.zoo:gpt2_tiny", "--rules", rules]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_binary_rules_file_exits_2(tmp_path, capsys):
    path = tmp_path / "rules.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["report", "fxlora.zoo:gpt2_tiny", "--rules", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_fidelity_from_the_command_line(tmp_path, capsys):
    rules = _write(tmp_path, "[[rule]]\ntarget = 'transformer.h.*.attn.c_attn'\nr = 4\nalpha = 8\nenable_lora = [true, false, true]\n")
    torch.manual_seed(0)
    gm = fxlora.rewrite(fxlora.zoo.gpt2_tiny(), fxlora.load_rules(rules))
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            gm.get_parameter(name).normal_(0, 0.01)
    adapter = fxlora.save_lora(gm, tmp_path / "a.safetensors")
    # gpt2_tiny is seeded by the factory's caller: the CLI builds its own model; fidelity only needs W, A, B.
    assert main(["report", "fxlora.zoo:gpt2_tiny", "--rules", rules, "--adapter", str(adapter), "--fidelity", "bf16"]) == 0
    assert "erased in bfloat16" in capsys.readouterr().out


def test_parse_budget():
    assert parse_budget("1%") == ("percent", 1.0)
    assert parse_budget("250_000") == ("count", 250000.0)
    assert parse_budget("2.5M") == ("count", 2.5e6)
    assert parse_budget("250k") == ("count", 250000.0)


def test_console_script_is_installed():
    proc = subprocess.run(
        [sys.executable, "-m", "fxlora.tools.cli", "report", "fxlora.zoo:gpt2_tiny", "--budget", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_demo_runs_end_to_end(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "every check passed" in out and "FAIL" not in out
    assert "ONNX operator count equals the base model's" in out and "latency" in out



@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_cli_never_shows_a_traceback_on_any_rules_file(tmp_path, capsys, text):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    code = main(["report", "fxlora.zoo:gpt2_tiny", "--rules", str(path), "--format", "json"])
    err = capsys.readouterr().err
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("fxlora report: ") and len(err.strip().splitlines()) == 1


_arg = st.one_of(
    st.sampled_from(["report", "paper", "demo", "--rules", "--format", "--budget", "--meta", "--fidelity", "--adapter",
                     "fxlora.zoo:gpt2_tiny", "fxlora.zoo:nope", "os:getcwd", "json", "1%", "-1", "bf16", "x:y:z", ""]),
    st.text(max_size=10),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_arg, max_size=6))
def test_cli_fuzzed_arguments_exit_cleanly(capsys, argv):
    if argv[:1] == ["demo"]:
        argv = ["demo", "--steps", "x"]  # keep the fuzz fast: a demo run is tested elsewhere
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits (--help, usage errors)
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err


# -- one line per error, whatever user code does ----------------------------------------------------

USER_MODULE = '''
import sys, warnings
import torch
from torch import nn


def multi_line():
    raise ValueError("first line\\nsecond line\\n\\n  third line")


def escapes():
    raise ValueError("\\x1b[31mred\\x1b[0m")


def exits_0():
    sys.exit(0)


def exits_3():
    sys.exit(3)


def exits_text():
    sys.exit("bye\\nnow")


def warns():
    warnings.warn("careful\\nvery careful", UserWarning)
    return nn.Sequential(nn.Linear(4, 4))


class ExitsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        sys.exit(5)


def exits_in_forward():
    return ExitsInForward()


class Custom(BaseException):
    pass


def cancelled():
    import asyncio
    raise asyncio.CancelledError("cancelled\\nby the loop")


def generator_exit():
    raise GeneratorExit()


def custom_base():
    raise Custom("not an Exception")


def interrupted():
    raise KeyboardInterrupt


class RaisesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        raise Custom("in forward\\ntwo lines")


def raises_base_in_forward():
    return RaisesInForward()
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "fxlora_cli_user_mod.py").write_text(USER_MODULE)
    (tmp_path / "fxlora_cli_exits_on_import.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fxlora_cli_user_mod"


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_multi_line_message_from_user_code_is_one_line(user_module, capsys):
    assert main(["report", f"{user_module}:multi_line"]) == 2
    line = _one_error_line(capsys)
    assert line == f"fxlora report: {user_module}:multi_line() raised ValueError: first line | second line | third line"
    assert main(["report", f"{user_module}:escapes"]) == 2  # an escape sequence is shown, not sent to the terminal
    assert _one_error_line(capsys).endswith("raised ValueError: \\x1b[31mred\\x1b[0m")


@pytest.mark.parametrize("factory, shown", [("exits_0", "sys.exit(0)"), ("exits_3", "sys.exit(3)"), ("exits_text", "sys.exit('bye\\nnow')")])
def test_a_factory_that_calls_sys_exit_gives_status_2_and_says_so(user_module, factory, shown, capsys):
    assert main(["report", f"{user_module}:{factory}"]) == 2
    line = _one_error_line(capsys)
    assert f"{factory}() called {shown.splitlines()[0]}" in line and "a factory must return a model" in line


def test_exits_while_importing_or_in_forward_give_status_2(user_module, capsys):
    assert main(["report", "fxlora_cli_exits_on_import:f"]) == 2
    assert "importing module 'fxlora_cli_exits_on_import' called sys.exit(4)" in _one_error_line(capsys)
    assert main(["report", f"{user_module}:exits_in_forward"]) == 2
    assert "the model's code called sys.exit(5)" in _one_error_line(capsys)


def test_warnings_are_one_line_each(user_module, capsys):
    assert main(["report", f"{user_module}:warns"]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["fxlora: warning: UserWarning: careful | very careful"]


@pytest.mark.parametrize(
    "argv, text",
    [
        (["demo", "--steps", "-1"], "argument --steps: must be a whole number from 1 to 1,000,000, got -1"),
        (["demo", "--steps", "0"], "from 1 to 1,000,000, got 0"),
        (["demo", "--steps", "10000000000"], "got 10,000,000,000"),
        (["demo", "--steps", "2.5"], "must be a whole number written with the digits 0-9, got '2.5'"),
        (["demo", "--steps", "５"], "digits 0-9, got '５'"),  # fullwidth: int() would take it
        (["demo", "--steps", "١٢"], "digits 0-9, got '١٢'"),  # Arabic-Indic
        (["demo", "--seed", "𝟘"], "digits 0-9, got '𝟘'"),
        (["demo", "--seed", "-3"], "argument --seed: must be a whole number from 0"),
    ],
)
def test_numeric_options_are_usage_errors_at_once(argv, text, capsys):
    import time

    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and time.perf_counter() - start < 1.0  # nothing ran
    out, err = capsys.readouterr()
    assert out == "" and text in err and err.endswith("(see fxlora demo --help)\n") and len(err.splitlines()) == 1


def test_demo_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file"), "--steps", "1"]) == 2
    assert "is a file; give a folder" in _one_error_line(capsys)


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--nope"]])
def test_top_level_usage_points_to_fxlora_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.endswith("(see fxlora --help)\n") and len(err.splitlines()) == 1


def test_help_says_how_to_get_a_commands_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "fxlora COMMAND --help" in capsys.readouterr().out


def test_regex_targets_in_rules_files_run_in_bounded_time(tmp_path, capsys):
    import time

    slow = _write(tmp_path, '[[rule]]\ntarget = "re:(.|.|.)*Z"\nr = 2\nalpha = 2\n')
    start = time.perf_counter()
    assert main(["report", "fxlora.zoo:gpt2_tiny", "--rules", slow]) == 2  # matches nothing, says so
    assert time.perf_counter() - start < 10 and "matched no module" in _one_error_line(capsys)
    backref = _write(tmp_path, '[[rule]]\ntarget = "re:(h)\\\\1"\nr = 2\nalpha = 2\n', name="b.toml")
    assert main(["report", "fxlora.zoo:gpt2_tiny", "--rules", backref]) == 2
    line = _one_error_line(capsys)
    assert "rule 1: target" in line and "backreference" in line


@pytest.mark.parametrize(
    "factory, shown",
    [
        ("cancelled", "cancelled() raised CancelledError: cancelled | by the loop"),
        ("generator_exit", "generator_exit() raised GeneratorExit"),
        ("custom_base", "custom_base() raised Custom: not an Exception"),
    ],
)
def test_a_factory_raising_any_base_exception_gives_one_line_and_status_2(user_module, factory, shown, capsys):
    assert main(["report", f"{user_module}:{factory}"]) == 2
    assert shown in _one_error_line(capsys)


def test_base_exceptions_from_the_models_code_and_interrupts_are_one_line(user_module, capsys):
    assert main(["report", f"{user_module}:raises_base_in_forward"]) == 2
    line = _one_error_line(capsys)
    assert "Custom" in line and "in forward | two lines" in line
    assert main(["report", f"{user_module}:interrupted"]) == 130
    assert _one_error_line(capsys) == "fxlora report: interrupted"


def test_budget_takes_ascii_digits_only():
    assert parse_budget("250k") == ("count", 250_000.0)
    for text in ("２５０k", "５%", "١٠٠"):
        with pytest.raises(fxlora.errors.UsageError, match="--budget"):
            parse_budget(text)


def test_a_failed_demo_check_is_one_line_on_stderr(monkeypatch, capsys):
    from fxlora.tools import demo

    def broken(*args, **kwargs):
        raise fxlora.CheckpointError("the adapter\ncannot be written")

    monkeypatch.setattr(fxlora, "save_lora", broken)
    assert main(["demo", "--steps", "1", "--no-onnx"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "FAILED" in err and "the adapter | cannot be written" in err, err
    assert demo.run_demo  # the demo module itself ran
