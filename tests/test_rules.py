"""fxlora.rules: rule validation, glob and regex matching, rules files."""

from __future__ import annotations

import fxlora
import pytest
from fxlora import Rule, RuleError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import (
    TinyTransformer,
)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"r": 0, "alpha": 1}, "r must be a positive int"),
        ({"r": -2, "alpha": 1}, "r must be a positive int"),
        ({"r": 2.5, "alpha": 1}, "r must be a positive int"),
        ({"r": 2, "alpha": 0}, "alpha must be a positive"),
        ({"r": 2, "alpha": -1.0}, "alpha must be a positive"),
        ({"r": 2, "alpha": float("nan")}, "alpha must be a positive"),
        ({"r": 2, "alpha": 1e-50}, "is not a normal float32 number"),  # the branch would round to zero
        ({"r": 2, "alpha": 2, "dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"r": 2, "alpha": 2, "dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"r": 2, "alpha": 2, "enable_lora": [False, False]}, "no True entry"),
        ({"r": 2, "alpha": 2, "enable_lora": []}, "enable_lora is empty"),
        ({"r": 2, "alpha": 2, "enable_lora": [1, 0]}, "list of bools"),
    ],
)
def test_bad_rule_arguments(kwargs, text):
    with pytest.raises(RuleError) as info:
        fxlora.Rule("blocks.*.qkv", **kwargs)
    assert text in str(info.value)
    assert "blocks.*.qkv" in str(info.value)


def test_bad_targets():
    with pytest.raises(RuleError, match="not a valid regular expression"):
        fxlora.Rule("re:blocks.(", r=1, alpha=1)
    with pytest.raises(RuleError, match="nn.Module subclass"):
        fxlora.Rule(3, r=1, alpha=1)
    with pytest.raises(RuleError, match="target is empty"):
        fxlora.Rule("", r=1, alpha=1)
    with pytest.raises(RuleError, match="rules is empty"):
        fxlora.rewrite(TinyTransformer(), [])
    with pytest.raises(RuleError, match="rules must be a Rule or a list"):
        fxlora.rewrite(TinyTransformer(), "blocks.0.qkv")


def test_glob_does_not_match_a_longer_index():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    sites = fxlora.graph_sites(fxlora.rewrite(model, [fxlora.Rule("1", r=1, alpha=1)]))
    assert list(sites) == ["1"]
    sites = fxlora.graph_sites(fxlora.rewrite(model, [fxlora.Rule("re:1", r=1, alpha=1)]))
    assert list(sites) == ["1"]


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


_rule_tables = st.dictionaries(
    st.sampled_from(["target", "type", "r", "alpha", "dropout", "enable_lora", "fan_in_fan_out", "rank", ""]),
    _values, max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_values, st.fixed_dictionaries({"rule": st.lists(_rule_tables, max_size=3)}), st.dictionaries(st.text(max_size=5), _values)))
def test_rules_parser_raises_only_rule_errors(data):
    try:
        rules = fxlora.rules_from_data(data)
    except RuleError as e:
        assert str(e)
    else:
        assert rules and all(isinstance(r, Rule) for r in rules)
