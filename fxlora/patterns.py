"""Regular expressions from files, matched in linear time.

``re`` backtracks: a pattern such as ``(.|.|.)*Z`` takes time exponential in the length of the name it
is matched against, so a pattern read from an untrusted file (PEFT's ``target_modules``,
``rank_pattern`` and ``alpha_pattern``, a rules file's ``re:`` targets) could hang fxlora.  This module
parses a pattern with Python's own parser (``re._parser``, so the syntax and meaning are exactly
``re``'s) and simulates it as a Thompson NFA (Pike VM), with the sets of NFA states reached so far
cached as DFA states.  Matching a string of length n against a pattern compiled to m instructions
takes O(n * m) steps in the worst case and O(n) dictionary look-ups once the states are cached.

What a backtracking engine needs and an automaton cannot do is refused with the caller's exception
type, naming the field the pattern came from: backreferences (``\\1``, ``(?P=name)``), conditionals,
lookarounds (``(?=``, ``(?!``, ``(?<=``, ``(?<!``), atomic groups and possessive repeats, and the flags
that change matching (``(?i)``, ``(?m)``, ``(?a)``, ``(?L)``).  ``(?s)`` and ``(?x)`` are supported.
Patterns longer than :data:`MAX_PATTERN_LENGTH` characters, or that expand to more than
:data:`MAX_PROGRAM` instructions (``a{1000}{1000}``), are refused too.

The work is bounded per file as well as per pattern: the patterns of one file (a PEFT config, a rules
file) share a :class:`PatternBudget` of :data:`MAX_FILE_PROGRAM` instructions and
:data:`MAX_FILE_PATTERNS` patterns, so a file of many large patterns is refused after a bounded amount of
compiling; and one match may visit at most :data:`MAX_MATCH_WORK` automaton states (not cached), so a
large pattern against a long name is refused, naming both, instead of running for minutes.

Only the yes/no answer is computed (no groups, no spans): that is all rule and config matching needs.
"""

from __future__ import annotations

import functools
from typing import Callable

from .errors import FxLoraError, RuleError

try:  # Python >= 3.11
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

import re

__all__ = [
    "Pattern",
    "PatternBudget",
    "compile_pattern",
    "try_compile",
    "MAX_PATTERN_LENGTH",
    "MAX_PROGRAM",
    "MAX_FILE_PROGRAM",
    "MAX_FILE_PATTERNS",
    "MAX_MATCH_WORK",
]

MAX_PATTERN_LENGTH = 10_000
MAX_PROGRAM = 50_000
MAX_FILE_PROGRAM = 100_000  # instructions, all the patterns of one file together
MAX_FILE_PATTERNS = 10_000  # patterns in one file
MAX_MATCH_WORK = 3_000_000  # automaton states one match may visit outside the caches
_CACHE_LIMIT = 20_000  # cached DFA states and transitions per pattern before the cache is reset

# Instruction kinds of the NFA program.
_CHAR, _SPLIT, _JMP, _AT, _MATCH = range(5)

_UNSUPPORTED = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group (?(...)...)",
    "GROUPREF_IGNORE": "a backreference",
    "GROUPREF_LOC_IGNORE": "a backreference",
    "GROUPREF_UNI_IGNORE": "a backreference",
    "ASSERT": "a lookahead or lookbehind ((?=...), (?<=...))",
    "ASSERT_NOT": "a negative lookahead or lookbehind ((?!...), (?<!...))",
    "ATOMIC_GROUP": "an atomic group (?>...)",
    "POSSESSIVE_REPEAT": "a possessive repeat (*+, ++, ?+)",
}
_FLAG_NAMES = {
    re.IGNORECASE: "(?i) IGNORECASE",
    re.MULTILINE: "(?m) MULTILINE",
    re.ASCII: "(?a) ASCII",
    re.LOCALE: "(?L) LOCALE",
}


class _Unsupported(Exception):
    pass


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[str, Callable[[str], bool]] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_NOT_DIGIT": lambda ch: not ch.isdecimal(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda ch: not ch.isspace(),
    "CATEGORY_WORD": _is_word,
    "CATEGORY_NOT_WORD": lambda ch: not _is_word(ch),
}


def _set_predicate(items: list) -> Callable[[str], bool]:
    """The membership test of a character class ``[...]`` (``IN`` in the parse tree)."""
    negate = False
    chars: set[str] = set()
    ranges: list[tuple[int, int]] = []
    cats: list[Callable[[str], bool]] = []
    for op, av in items:
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            chars.add(chr(av))
        elif name == "RANGE":
            ranges.append(av)
        elif name == "CATEGORY":
            fn = _CATEGORIES.get(str(av))
            if fn is None:
                raise _Unsupported(f"the character category {av}")
            cats.append(fn)
        else:
            raise _Unsupported(f"{name} inside a character class")
    frozen = frozenset(chars)

    def member(ch: str) -> bool:
        if ch in frozen:
            return not negate
        o = ord(ch)
        hit = any(lo <= o <= hi for lo, hi in ranges) or any(fn(ch) for fn in cats)
        return hit != negate

    return member


class _Compiler:
    """Parse tree -> NFA program: a list of (kind, argument) instructions; ``_SPLIT`` takes two
    targets (in priority order, irrelevant for a yes/no answer), ``_JMP`` one."""

    def __init__(self, dotall: bool, limit: int = MAX_PROGRAM) -> None:
        self.prog: list[list] = []
        self.dotall = dotall
        self.limit = limit

    def emit(self, kind: int, arg=None) -> int:
        if len(self.prog) >= self.limit:
            raise _Unsupported(f"constructs that expand to more than {self.limit} automaton states")
        self.prog.append([kind, arg])
        return len(self.prog) - 1

    def seq(self, items, dotall: bool) -> None:
        for op, av in items:
            self.item(str(op), av, dotall)

    def item(self, op: str, av, dotall: bool) -> None:
        if op in _UNSUPPORTED:
            raise _Unsupported(_UNSUPPORTED[op])
        if op == "LITERAL":
            ch = chr(av)
            self.emit(_CHAR, ch.__eq__)
        elif op == "NOT_LITERAL":
            ch = chr(av)
            self.emit(_CHAR, ch.__ne__)
        elif op == "ANY":
            self.emit(_CHAR, (lambda c: True) if dotall else "\n".__ne__)
        elif op == "IN":
            self.emit(_CHAR, _set_predicate(av))
        elif op == "BRANCH":
            alternatives = av[1]
            jumps = []
            for i, alt in enumerate(alternatives):
                if i < len(alternatives) - 1:
                    split = self.emit(_SPLIT)
                    self.prog[split][1] = (split + 1, None)
                    self.seq(alt, dotall)
                    jumps.append(self.emit(_JMP))
                    self.prog[split][1] = (split + 1, len(self.prog))
                else:
                    self.seq(alt, dotall)
            for j in jumps:
                self.prog[j][1] = len(self.prog)
        elif op == "SUBPATTERN":
            _group, add_flags, del_flags, sub = av
            self._check_flags(add_flags)
            inner = (dotall or bool(add_flags & re.DOTALL)) and not (del_flags & re.DOTALL)
            self.seq(sub, inner)
        elif op in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, sub = av
            if lo > MAX_PROGRAM:
                raise _Unsupported(f"a repeat count of {lo}")
            for _ in range(lo):
                self.seq(sub, dotall)
            if hi == _c.MAXREPEAT:
                loop = self.emit(_SPLIT)
                self.seq(sub, dotall)
                self.emit(_JMP, loop)
                self.prog[loop][1] = (loop + 1, len(self.prog))
            else:
                if hi - lo > MAX_PROGRAM:
                    raise _Unsupported(f"a repeat count of {hi}")
                splits = []
                for _ in range(hi - lo):
                    splits.append(self.emit(_SPLIT))
                    self.seq(sub, dotall)
                for s in splits:
                    self.prog[s][1] = (s + 1, len(self.prog))
        elif op == "AT":
            code = str(av)
            if code not in ("AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING", "AT_BOUNDARY",
                            "AT_NON_BOUNDARY"):
                raise _Unsupported(f"the anchor {code}")
            self.emit(_AT, code)
        else:
            raise _Unsupported(f"the construct {op}")

    @staticmethod
    def _check_flags(flags: int) -> None:
        for flag, name in _FLAG_NAMES.items():
            if flags & flag:
                raise _Unsupported(f"the flag {name}")


class Pattern:
    """A compiled pattern: :meth:`fullmatch` and :meth:`match` answer as ``re.fullmatch`` /
    ``re.match`` would (``is not None``), in time linear in the length of the string."""

    def __init__(self, pattern: str, prog: list[list], uses_context: bool) -> None:
        self.pattern = pattern
        self._prog = [tuple(i) for i in prog]
        self._uses_context = uses_context
        self._closures: dict = {}
        self._steps: dict = {}
        self._work = 0  # states visited outside the caches by the match in progress
        self._subject = ""
        self._field = "a pattern"
        self._error: type[FxLoraError] = RuleError

    def _for(self, field: str, error: type[FxLoraError]) -> Pattern:
        """This pattern (sharing its program and caches) reporting a too-slow match as ``error`` naming
        ``field``."""
        bound = object.__new__(Pattern)
        bound.__dict__.update(self.__dict__)
        bound._field, bound._error = field, error
        return bound

    @property
    def size(self) -> int:
        """The number of automaton instructions."""
        return len(self._prog)

    def _charge(self, n: int, s: str) -> None:
        self._work += n
        if self._work > MAX_MATCH_WORK:
            raise self._error(
                f"{self._field}: the pattern {_short(self.pattern)} needs more than {MAX_MATCH_WORK} automaton steps to "
                f"match the name {_short(s)} ({len(s)} characters); use a smaller pattern (fewer counted repeats)."
            )

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"

    # -- the automaton ---------------------------------------------------------------------------
    def _context(self, s: str, i: int) -> tuple | None:
        if not self._uses_context:
            return None
        n = len(s)
        prev_word = i > 0 and _is_word(s[i - 1])
        next_word = i < n and _is_word(s[i])
        return (i == 0, i == n, i == n - 1 and s[i] == "\n", prev_word, next_word, n == 0)

    @staticmethod
    def _assert(code: str, ctx: tuple) -> bool:
        at_start, at_end, before_final_newline, prev_word, next_word, empty = ctx
        if code in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
            return at_start
        if code == "AT_END":
            return at_end or before_final_newline
        if code == "AT_END_STRING":
            return at_end
        if code == "AT_BOUNDARY":
            return prev_word != next_word
        return not empty and prev_word == next_word  # AT_NON_BOUNDARY, as sre (never on "")

    def _closure(self, pcs: frozenset, ctx: tuple | None) -> tuple[frozenset, bool]:
        """The consuming instructions reachable from ``pcs`` without reading a character, and whether
        the match instruction is reachable (an explicit stack: no recursion, each state once)."""
        key = (pcs, ctx)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        prog = self._prog
        self._charge(len(pcs) + 1, self._subject)
        seen: set[int] = set()
        consuming: list[int] = []
        matched = False
        stack = sorted(pcs, reverse=True)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            if len(seen) & 1023 == 0:
                self._charge(1024, self._subject)
            kind, arg = prog[pc]
            if kind == _CHAR:
                consuming.append(pc)
            elif kind == _MATCH:
                matched = True
            elif kind == _JMP:
                stack.append(arg)
            elif kind == _SPLIT:
                stack.append(arg[1])
                stack.append(arg[0])
            elif kind == _AT:
                if self._assert(arg, ctx):  # type: ignore[arg-type]
                    stack.append(pc + 1)
        result = (frozenset(consuming), matched)
        if len(self._closures) > _CACHE_LIMIT:
            self._closures.clear()
        self._closures[key] = result
        return result

    def _step(self, state: frozenset, ch: str) -> frozenset:
        key = (state, ch)
        hit = self._steps.get(key)
        if hit is not None:
            return hit
        prog = self._prog
        self._charge(len(state) + 1, self._subject)
        nxt = frozenset(pc + 1 for pc in state if prog[pc][1](ch))
        if len(self._steps) > _CACHE_LIMIT:
            self._steps.clear()
        self._steps[key] = nxt
        return nxt

    def _run(self, s: str, full: bool) -> bool:
        self._work, self._subject = 0, s
        state, matched = self._closure(frozenset((0,)), self._context(s, 0))
        if matched and not full:
            return True
        for i, ch in enumerate(s):
            pcs = self._step(state, ch)
            if not pcs:
                return False
            state, matched = self._closure(pcs, self._context(s, i + 1))
            if matched and not full:
                return True
        return matched

    def fullmatch(self, s: str) -> bool:
        """``re.fullmatch(pattern, s) is not None``."""
        return self._run(s, full=True)

    def match(self, s: str) -> bool:
        """``re.match(pattern, s) is not None`` (anchored at the start, may end anywhere)."""
        return self._run(s, full=False)


@functools.lru_cache(maxsize=512)
def _compile(pattern: str, limit: int = MAX_PROGRAM) -> Pattern | str:
    """The compiled pattern, or the reason it cannot be compiled (a string)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"it is {len(pattern)} characters long (at most {MAX_PATTERN_LENGTH})"
    try:
        re.compile(pattern)  # the reference's own verdict on the syntax
    except (re.error, RecursionError, OverflowError) as e:
        return f"it is not a valid regular expression ({e})"
    try:
        tree = _sre_parse.parse(pattern)
        flags = tree.state.flags
        _Compiler._check_flags(flags)
        compiler = _Compiler(bool(flags & re.DOTALL), limit)
        compiler.seq(tree, compiler.dotall)
        compiler.emit(_MATCH)
    except _Unsupported as e:
        return (
            f"it uses {e}, which patterns read from files may not use (fxlora matches them with a linear-time "
            "automaton, so that no pattern can hang it)"
        )
    except (re.error, RecursionError, OverflowError) as e:
        return f"it is not a valid regular expression ({e})"
    uses_context = any(kind == _AT for kind, _ in compiler.prog)
    return Pattern(pattern, compiler.prog, uses_context)


class PatternBudget:
    """What the patterns of one file (``source``) may cost together: :data:`MAX_FILE_PROGRAM` automaton
    instructions and :data:`MAX_FILE_PATTERNS` patterns.  Pass it to every :func:`compile_pattern` call
    for that file; the call that goes over raises, naming its field and the file's totals."""

    def __init__(self, source: str, *, states: int = MAX_FILE_PROGRAM, patterns: int = MAX_FILE_PATTERNS) -> None:
        self.source = source
        self.states = states
        self.patterns = patterns
        self.used_states = 0
        self.used_patterns = 0

    def _refuse(self, field: str, error: type[FxLoraError], what: str) -> FxLoraError:
        return error(
            f"{field}: {self.source} has {what}; fxlora bounds the work a file may ask for. Use fewer or smaller "
            "patterns (one alternation such as 'q_proj|v_proj' instead of many entries, no large counted repeats)."
        )


def compile_pattern(
    pattern: object, *, field: str, error: type[FxLoraError] = RuleError, budget: PatternBudget | None = None
) -> Pattern:
    """Compile ``pattern`` for linear-time matching, or raise ``error`` naming ``field`` (where the
    pattern was read, e.g. ``"adapter_config.json: rank_pattern key 'q|v'"``) and why.  With ``budget``,
    the pattern is charged to its file's total (see :class:`PatternBudget`)."""
    if not isinstance(pattern, str):
        raise error(f"{field}: a pattern must be a string, got {type(pattern).__name__}.")
    limit = MAX_PROGRAM
    if budget is not None:
        budget.used_patterns += 1
        if budget.used_patterns > budget.patterns:
            raise budget._refuse(field, error, f"more than {budget.patterns} patterns")
        limit = max(1, min(MAX_PROGRAM, budget.states - budget.used_states))
    compiled = _compile(pattern, limit)
    if isinstance(compiled, str):
        if budget is not None and limit < MAX_PROGRAM and "automaton states" in compiled:
            raise budget._refuse(
                field, error, f"patterns that expand to more than {budget.states} automaton states together"
            )
        raise error(f"{field}: the pattern {_short(pattern)} cannot be used: {compiled}.")
    if budget is not None:
        budget.used_states += compiled.size
    return compiled._for(field, error)


def try_compile(pattern: str) -> Pattern | None:
    """The compiled pattern, or None when this matcher cannot take it (the caller may then use ``re``,
    for patterns it trusts)."""
    compiled = _compile(pattern)
    return None if isinstance(compiled, str) else compiled


def _short(pattern: str, limit: int = 80) -> str:
    return repr(pattern) if len(pattern) <= limit else repr(pattern[:limit]) + "..."
