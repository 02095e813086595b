"""The metric names a PromQL expression reads, found by a small tokenizer (promtool prints no syntax tree).

What is not a metric name is recognised by its place: label matchers inside `{...}` (but `__name__="x"` names x),
label lists after by/without/on/ignoring/group_left/group_right, a name followed by `(` (a function or an
aggregation), aggregation operators followed by by/without, keywords (and, or, unless, offset, bool, inf, nan),
durations (`[5m]`, `[$__rate_interval]`, `offset 1h`), strings, numbers and Grafana variables (`$service`,
`${city}`). Names are returned as written: `x_bucket`, `x_total` and recorded `level:metric:op` names included.
Anything the tokenizer does not know raises PromQLSyntaxError, so an expression is never half read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]\[]*\])
    |(?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+(?![\w.]))
    |(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<variable>\$\{[^}]*\}|\$\w+)
    |(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}@])
    """,
    re.VERBOSE,
)
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"})
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)


class PromQLSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokens(expr: str) -> Iterator[_Token]:
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None or match.lastgroup is None:
            raise PromQLSyntaxError(f"cannot read {expr[position : position + 20]!r} at {position} in {expr!r}")
        if match.lastgroup != "space":
            yield _Token(match.lastgroup, match.group(), position)
        position = match.end()


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` selects."""
    return _read(expr)[0]


def label_equalities(expr: str) -> set[tuple[str, str]]:
    """Every (label, value) an equality matcher `label="value"` of `expr` asks for (`__name__` and matchers whose
    value holds a Grafana variable left out): series with that label value must exist for the selector to match."""
    return _read(expr)[1]


def _read(expr: str) -> tuple[set[str], set[tuple[str, str]]]:
    tokens = list(_tokens(expr))
    names: set[str] = set()
    equalities: set[tuple[str, str]] = set()
    depth = 0  # of parentheses, only to check the balance
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "op" and token.text == "{":
            index = _matchers(tokens, index + 1, names, equalities, expr)
            continue
        if token.kind == "op" and token.text in "()":
            depth += 1 if token.text == "(" else -1
            if depth < 0:
                raise PromQLSyntaxError(f"unbalanced ')' at {token.position} in {expr!r}")
        elif token.kind == "name":
            word = token.text
            opens = following is not None and following.text == "("
            if word in _LABEL_LIST_KEYWORDS:
                if opens:
                    index = _skip_parenthesised(tokens, index + 1, expr)
                    continue
            elif word in _KEYWORDS or opens:
                pass  # a keyword, or a function / aggregation applied to its arguments
            elif word in _AGGREGATIONS and following is not None and following.text in ("by", "without"):
                pass
            else:
                names.add(word)
        index += 1
    if depth != 0:
        raise PromQLSyntaxError(f"unbalanced '(' in {expr!r}")
    return names, equalities


def _matchers(tokens: list[_Token], index: int, names: set[str], equalities: set[tuple[str, str]], expr: str) -> int:
    """Reads label matchers up to the closing brace (a `__name__` equality names a metric; other equalities are
    collected); returns the index after it."""
    while index < len(tokens):
        token = tokens[index]
        if token.text == "}":
            return index + 1
        if token.kind == "name" and index + 2 < len(tokens):
            operator, value = tokens[index + 1], tokens[index + 2]
            if operator.text == "=" and value.kind == "string":
                text = value.text[1:-1]
                if token.text == "__name__":
                    names.add(text)
                elif "$" not in text:
                    equalities.add((token.text, text))
                index += 3
                continue
        index += 1
    raise PromQLSyntaxError(f"unclosed '{{' in {expr!r}")


def _skip_parenthesised(tokens: list[_Token], index: int, expr: str) -> int:
    """From an opening parenthesis, the index after its closing one (a label list holds no parentheses)."""
    for position in range(index + 1, len(tokens)):
        if tokens[position].text == ")":
            return position + 1
        if tokens[position].kind != "name" and tokens[position].text != ",":
            raise PromQLSyntaxError(f"unexpected {tokens[position].text!r} in a label list in {expr!r}")
    raise PromQLSyntaxError(f"unclosed label list in {expr!r}")
