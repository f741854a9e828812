"""fxlora.patterns: re's meaning, linear time, and a clear refusal of what an automaton cannot do."""

from __future__ import annotations

import re
import time

import pytest
from fxlora import CheckpointError, RuleError
from fxlora.patterns import compile_pattern
from hypothesis import given, settings
from hypothesis import strategies as st

_ATOMS = ["a", "b", r"\.", ".", "[ab]", "[^a]", r"\d", r"\w", "[a-c1]", ""]


def _pattern(depth: int = 0):
    atom = st.sampled_from(_ATOMS)
    if depth >= 2:
        return atom
    sub = _pattern(depth + 1)
    return st.one_of(
        atom,
        st.tuples(sub, sub).map("".join),
        st.tuples(sub, sub).map(lambda t: f"({t[0]}|{t[1]})"),
        st.tuples(sub, st.sampled_from(["*", "+", "?", "*?", "{2}", "{1,3}", "{0,2}?"])).map(
            lambda t: f"(?:{t[0]}){t[1]}"
        ),
        st.tuples(st.sampled_from(["^", r"\b", r"\B", ""]), sub, st.sampled_from(["$", r"\Z", r"\b", ""])).map("".join),
    )


@settings(max_examples=300, deadline=None)
@given(_pattern(), st.lists(st.text(alphabet="ab.1_\n ", max_size=7), min_size=1, max_size=6))
def test_answers_as_re_does(pattern, strings):
    compiled = compile_pattern(pattern, field="test")
    for s in strings:
        assert compiled.fullmatch(s) == (re.fullmatch(pattern, s) is not None), (pattern, s)
        assert compiled.match(s) == (re.match(pattern, s) is not None), (pattern, s)


def test_peft_style_suffix_patterns():
    p = compile_pattern(r"(.*\.)?(q_proj|layers\.1\.self_attn\.v_proj)$", field="rank_pattern")
    assert p.match("model.layers.0.self_attn.q_proj")
    assert p.match("q_proj")
    assert p.match("model.layers.1.self_attn.v_proj")
    assert not p.match("model.layers.11.self_attn.v_proj")
    assert not p.match("model.layers.0.self_attn.xq_proj")


@pytest.mark.parametrize("pattern", [r"(.|.|.)*Z", r"(a|aa)*c", r"(x+x+)+y", r"(a*)*b", r"(?:a?){30}a{30}"])
def test_catastrophic_patterns_run_in_linear_time(pattern):
    compiled = compile_pattern(pattern, field="target_modules")
    text = ("a" if "x" not in pattern else "x") * 20_000
    start = time.perf_counter()
    assert not compiled.fullmatch(text + "!")
    assert not compiled.match("!" + text)
    assert time.perf_counter() - start < 1.0  # re needs longer than the age of the universe for the first


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"(a)\1", "backreference"),
        (r"(?P<x>a)(?P=x)", "backreference"),
        (r"(?=a)a", "lookahead"),
        (r"a(?!b)", "negative lookahead"),
        (r"(?<=a)b", "lookbehind"),
        (r"(a)?(?(1)b|c)", "conditional"),
        (r"(?>a+)b", "atomic group"),
        (r"a++", "possessive"),
        (r"(?i)q_proj", "IGNORECASE"),
        (r"(?m)^a$", "MULTILINE"),
        (r"(?:(?:a{1000}){1000})", "50000"),
        (r"(", "not a valid regular expression"),
        ("x" * 20_000, "characters long"),
    ],
)
def test_what_an_automaton_cannot_do_is_refused_naming_the_field(pattern, why):
    with pytest.raises(CheckpointError) as info:
        compile_pattern(pattern, field="adapter_config.json: field 'rank_pattern' key 'k'", error=CheckpointError)
    assert why in str(info.value) and "field 'rank_pattern'" in str(info.value)
    with pytest.raises(RuleError, match="rules.toml: rule 1: target"):
        compile_pattern(pattern, field="rules.toml: rule 1: target")


def test_a_non_string_pattern_is_refused():
    with pytest.raises(CheckpointError, match="target_modules: a pattern must be a string, got int"):
        compile_pattern(3, field="target_modules", error=CheckpointError)


def test_dotall_and_verbose_are_supported():
    assert compile_pattern(r"(?s)a.b", field="t").fullmatch("a\nb")
    assert not compile_pattern(r"a.b", field="t").fullmatch("a\nb")
    assert compile_pattern(r"(?x) a \. b  # comment", field="t").fullmatch("a.b")


def test_a_rules_files_patterns_share_one_budget():
    from fxlora.rules import rules_from_data

    data = {"rule": [{"target": f"re:.{{0,12000}}Q{i}", "r": 2, "alpha": 2} for i in range(60)]}
    start = time.perf_counter()
    with pytest.raises(RuleError, match=r"rules.toml: rule \d+: target: rules.toml has patterns that expand to more"):
        rules_from_data(data, "rules.toml")
    assert time.perf_counter() - start < 10.0  # about a second on one slow core; 7 s before the budget
    few = {"rule": [{"target": f"re:.{{0,100}}Q{i}", "r": 2, "alpha": 2} for i in range(60)]}
    assert len(rules_from_data(few, "rules.toml")) == 60  # ordinary files are far inside it


def test_the_budget_counts_patterns_and_states():
    from fxlora.patterns import PatternBudget

    budget = PatternBudget("'config.json'", states=1000, patterns=3)
    compile_pattern("a{400}", field="f1", budget=budget)
    with pytest.raises(CheckpointError, match="f2: 'config.json' has patterns that expand to more than 1000"):
        compile_pattern("b{700}", field="f2", error=CheckpointError, budget=budget)
    budget = PatternBudget("'config.json'", states=1000, patterns=2)
    compile_pattern("a", field="f1", budget=budget)
    compile_pattern("b", field="f2", budget=budget)
    with pytest.raises(RuleError, match="f3: 'config.json' has more than 2 patterns"):
        compile_pattern("c", field="f3", budget=budget)
