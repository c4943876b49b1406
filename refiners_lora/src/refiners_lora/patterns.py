"""PEFT's `alpha_pattern` / `rank_pattern` keys, matched against module names in bounded time.

PEFT gives a module the value of the first key of a pattern dict that matches it as `re.match(rf"(.*\\.)?({key})$",
name)`: the key, a regular expression, must match the whole name or a part of it that starts after a dot. A key comes
from the file, so Python's backtracking `re` could spend forever on it (`(.*)*\\d\\d\\d\\d`). Here a key is parsed
with Python's own regular expression parser, then:

- a key without repetition or alternation (a module name, where `.` matches any character, as in PEFT) is matched
  with `re`, in time proportional to the name's length times the key's;
- any other key is compiled to an automaton and run over the name one character at a time, never backtracking: time
  proportional to the name's length times the automaton's size, which is bounded.

A key longer than `MAX_KEY_LENGTH`, with more than `MAX_STATES` automaton states, or using what the automaton does not
have (backreferences, lookaround, conditionals, possessive repeats, atomic groups, inline flags, `\\b`) is refused
before any matching starts, as is a pattern dict of more than `MAX_KEYS` keys.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from typing import Any

# Python's own regular expression parser and its constants: private modules without type stubs.
sre: Any = importlib.import_module("re._constants")
sre_parse: Any = importlib.import_module("re._parser")

MAX_KEY_LENGTH = 256
MAX_KEYS = 4096
MAX_STATES = 2048
_CACHE_LIMIT = 65_536

_CHARACTERS = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN}
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT}
_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}


class PatternError(ValueError):
    """A pattern key that could take unbounded time, or that is not a regular expression; the message says why."""


class Pattern:
    """One key of a PEFT pattern dict; `matches(name)` is PEFT's test, `(.*\\.)?(key)$`, in bounded time."""

    def __init__(self, key: str) -> None:
        if not isinstance(key, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise PatternError(f"the key {key!r} is not a string")
        if len(key) > MAX_KEY_LENGTH:
            raise PatternError(f"the key {key[:40]!r}... is {len(key)} characters long, more than {MAX_KEY_LENGTH}")
        try:
            parsed: Any = sre_parse.parse(key)
        except (re.error, RecursionError, OverflowError) as error:
            raise PatternError(f"the key {key!r} is not a regular expression: {error}") from error
        if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
            raise PatternError(f"the key {key!r} sets flags: not supported")
        self.key = key
        self._edges: list[list[tuple[Callable[[str], bool], int]]] = []
        self._epsilons: list[list[tuple[str | None, int]]] = []
        self._start = self._new()
        self._accept = self._sequence(parsed, self._start)
        self._simple = re.compile(rf"(.*\.)?({key})$") if _fixed(parsed) else None
        self._closures: dict[tuple[frozenset[int], bool], frozenset[int]] = {}
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def matches(self, name: str) -> bool:
        """Whether PEFT would give `name` this key's value."""
        if self._simple is not None:
            return self._simple.match(name) is not None
        start = self._closure(frozenset((self._start,)), begin=False)
        current = self._closure(frozenset((self._start,)), begin=True)
        position = 0
        while position < len(name):
            if not current:  # nothing alive: jump to the next place a match may start
                position = name.find(".", position)
                if position < 0:
                    return False
                position += 1
                current = start
                continue
            character = name[position]
            current = self._step(current, character)
            position += 1
            if character == ".":
                current = current | start
        return self._accept in self._closure(current, begin=not name, end=True)

    def _step(self, states: frozenset[int], character: str) -> frozenset[int]:
        cached = self._steps.get((states, character))
        if cached is None:
            reached = frozenset(t for s in states for test, t in self._edges[s] if test(character))
            cached = self._closure(reached, begin=False)
            if len(self._steps) >= _CACHE_LIMIT:
                self._steps.clear()
            self._steps[(states, character)] = cached
        return cached

    def _closure(self, states: frozenset[int], *, begin: bool, end: bool = False) -> frozenset[int]:
        if not end and (cached := self._closures.get((states, begin))) is not None:
            return cached
        seen, stack = set(states), list(states)
        while stack:
            for condition, target in self._epsilons[stack.pop()]:
                passes = condition is None or (condition == "begin" and begin) or (condition == "end" and end)
                if passes and target not in seen:
                    seen.add(target)
                    stack.append(target)
        closure = frozenset(seen)
        if not end:
            if len(self._closures) >= _CACHE_LIMIT:
                self._closures.clear()
            self._closures[(states, begin)] = closure
        return closure

    def _new(self) -> int:
        if len(self._edges) >= MAX_STATES:
            raise PatternError(f"the key {self.key!r} is too complex (more than {MAX_STATES} automaton states)")
        self._edges.append([])
        self._epsilons.append([])
        return len(self._edges) - 1

    def _sequence(self, items: Iterable[tuple[Any, Any]], start: int) -> int:
        state = start
        for op, argument in items:
            state = self._item(op, argument, state)
        return state

    def _item(self, op: Any, argument: Any, start: int) -> int:
        if op in _CHARACTERS:
            end = self._new()
            self._edges[start].append((_test(op, argument), end))
            return end
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, items = argument
            if add_flags or del_flags:
                raise PatternError(f"the key {self.key!r} sets flags: not supported")
            return self._sequence(items, start)
        if op is sre.BRANCH:
            end = self._new()
            for alternative in argument[1]:
                first = self._new()
                self._epsilons[start].append((None, first))
                self._epsilons[self._sequence(alternative, first)].append((None, end))
            return end
        if op in _REPEATS:
            low, high, items = argument
            if low > MAX_STATES or (high != sre.MAXREPEAT and high - low > MAX_STATES):
                raise PatternError(f"the key {self.key!r} repeats {low} to {high} times: too complex")
            state = start
            for _ in range(low):
                state = self._sequence(items, state)
            end = self._new()
            if high == sre.MAXREPEAT:
                self._epsilons[state].append((None, end))
                self._epsilons[self._sequence(items, end)].append((None, end))
                return end
            for _ in range(high - low):
                self._epsilons[state].append((None, end))
                state = self._sequence(items, state)
            self._epsilons[state].append((None, end))
            return end
        if op is sre.AT and argument in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_END, sre.AT_END_STRING):
            end = self._new()
            condition = "begin" if argument in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING) else "end"
            self._epsilons[start].append((condition, end))
            return end
        raise PatternError(f"the key {self.key!r} uses {str(op).lower()} ({argument!r}): not supported")


def compile_patterns(patterns: dict[str, Any]) -> list[tuple[Pattern, Any]]:
    """Every key of a PEFT pattern dict compiled (in the dict's order, which decides between keys), with its value.

    Raises PatternError for more than `MAX_KEYS` keys or a key `Pattern` refuses.
    """
    if len(patterns) > MAX_KEYS:
        raise PatternError(f"{len(patterns)} keys, more than {MAX_KEYS}")
    return [(Pattern(key), value) for key, value in patterns.items()]


def _fixed(items: Any) -> bool:
    """Whether a parsed expression has no repetition and no alternation (backtracking is then linear)."""
    for op, argument in items:
        if op in _REPEATS or op is sre.BRANCH:
            return False
        if op is sre.SUBPATTERN and not _fixed(argument[3]):
            return False
    return True


def _test(op: Any, argument: Any) -> Callable[[str], bool]:
    if op is sre.LITERAL:
        expected = chr(argument)
        return lambda c: c == expected
    if op is sre.NOT_LITERAL:
        excluded = chr(argument)
        return lambda c: c != excluded
    if op is sre.ANY:
        return lambda c: c != "\n"
    negate = False
    tests: list[Callable[[str], bool]] = []
    for kind, value in argument:
        if kind is sre.NEGATE:
            negate = True
        elif kind is sre.LITERAL:
            tests.append(_between(value, value))
        elif kind is sre.RANGE:
            tests.append(_between(*value))
        elif kind is sre.CATEGORY and value in _CATEGORIES:
            tests.append(_CATEGORIES[value])
        else:
            raise PatternError(f"a character set uses {str(kind).lower()} ({value!r}): not supported")
    return lambda c: any(test(c) for test in tests) != negate


def _between(low: int, high: int) -> Callable[[str], bool]:
    return lambda c: low <= ord(c) <= high
