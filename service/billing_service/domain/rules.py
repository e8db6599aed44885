"""Rules as data: a small expression tree that the domain evaluates and storage compiles to SQL.

A rule that the database must apply atomically (the fit of a hold, the reason of a denial) is
written once as a tree of these nodes. `evaluate` gives its value in Python over domain objects;
storage.rule_sql turns the same tree into SQLAlchemy expressions and PostgreSQL text. Nothing
here knows SQL: a Column is a name the two sides map (an attribute here, a column there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

Value = int | str | bool
Comparison = Literal["==", "!=", "<", "<=", ">", ">="]


@dataclass(frozen=True, slots=True)
class Column:
    """A field of one row of `table` (tenants, budgets): an attribute of the object that
    stands for the row in Python, a column in SQL."""

    table: str
    name: str


@dataclass(frozen=True, slots=True)
class Param:
    """A value of the call (the amount of a hold)."""

    name: str


@dataclass(frozen=True, slots=True)
class Const:
    value: Value


@dataclass(frozen=True, slots=True)
class Add:
    terms: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Sub:
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Compare:
    op: Comparison
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class AllOf:
    """True when every condition is (SQL AND; an empty AllOf is true)."""

    conditions: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    condition: Expr


@dataclass(frozen=True, slots=True)
class Case:
    """The value of the first `when` whose condition holds, else `otherwise`."""

    whens: tuple[tuple[Expr, Expr], ...]
    otherwise: Expr


Expr = Column | Param | Const | Add | Sub | Compare | AllOf | Not | Case

# A row as Python sees it: the object of each table (read by attribute).
Rows = Mapping[str, object]
Params = Mapping[str, Value]

_COMPARE: dict[Comparison, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def evaluate(expr: Expr, rows: Rows, params: Params | None = None) -> Any:
    """The value of `expr` for these rows and call parameters, as SQL would compute it.

    Strings compare by value, so a StrEnum attribute equals the Const of its value.
    """
    return _compiled(expr)(rows, params or {})


Compiled = Callable[[Rows, Params], Any]


@cache
def _compiled(expr: Expr) -> Compiled:
    """`expr` as nested closures, built once per rule: evaluated per call on the hot path."""
    match expr:
        case Column(table, name):
            return lambda rows, _params: getattr(rows[table], name)
        case Param(name):
            return lambda _rows, params: params[name]
        case Const(value):
            return lambda _rows, _params: value
        case Add(terms):
            parts = tuple(_compiled(term) for term in terms)
            return lambda rows, params: sum(part(rows, params) for part in parts)
        case Sub(left, right):
            first, second = _compiled(left), _compiled(right)
            return lambda rows, params: first(rows, params) - second(rows, params)
        case Compare(op, left, right):
            compare, first, second = _COMPARE[op], _compiled(left), _compiled(right)
            return lambda rows, params: compare(first(rows, params), second(rows, params))
        case AllOf(conditions):
            checks = tuple(_compiled(condition) for condition in conditions)
            return lambda rows, params: all(check(rows, params) for check in checks)
        case Not(condition):
            negated = _compiled(condition)
            return lambda rows, params: not negated(rows, params)
        case Case(whens, otherwise):
            branches = tuple((_compiled(when), _compiled(value)) for when, value in whens)
            fallback = _compiled(otherwise)

            def choose(rows: Rows, params: Params) -> Any:
                for when, value in branches:
                    if when(rows, params):
                        return value(rows, params)
                return fallback(rows, params)

            return choose
    raise TypeError(f"not a rule expression: {expr!r}")
