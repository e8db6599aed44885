"""Compiles the domain's rules (domain.rules) into SQL: SQLAlchemy expressions for statements
built with Core, and PostgreSQL text for the hand-written hot-path statements.

The domain names columns by table; a statement says where each comes from (a table, an alias
in a CTE, a subquery), so one rule compiles into every statement that must apply it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from functools import reduce
from typing import Any

from sqlalchemy import and_, case, literal, literal_column, not_
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ColumnElement

from billing_service.domain.rules import (
    Add,
    AllOf,
    Case,
    Column,
    Compare,
    Const,
    Expr,
    Not,
    Param,
    Sub,
)

Resolve = Callable[[Column], ColumnElement[Any]]

_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def to_sql(
    expr: Expr, columns: Resolve, params: Mapping[str, ColumnElement[Any]] | None = None
) -> ColumnElement[Any]:
    """`expr` as a SQLAlchemy expression; `columns` says where each column is read from."""

    def build(node: Expr) -> ColumnElement[Any]:
        match node:
            case Column():
                return columns(node)
            case Param(name):
                assert params is not None, f"parameter {name} needed"
                return params[name]
            case Const(value):
                return literal(value)
            case Add(terms):
                return reduce(operator.add, (build(term) for term in terms))
            case Sub(left, right):
                return build(left) - build(right)
            case Compare(op, left, right):
                return _OPERATORS[op](build(left), build(right))  # type: ignore[no-any-return]
            case AllOf(conditions):
                return and_(*(build(condition) for condition in conditions))
            case Not(condition):
                return not_(build(condition))
            case Case(whens, otherwise):
                return case(
                    *((build(when), build(value)) for when, value in whens), else_=build(otherwise)
                )
        raise TypeError(f"not a rule expression: {node!r}")

    return build(expr)


def from_tables(tables: Mapping[str, Any]) -> Resolve:
    """Columns of SQLAlchemy tables or aliases, by the domain's table name."""
    return lambda column: tables[column.table].c[column.name]


def qualified(names: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Resolve:
    """Columns as SQL text `<name>.<column>`, for text statements: `names` maps the domain's
    table to the alias a statement reads it under; `overrides` gives SQL text for some columns
    (by column name) instead."""

    def resolve(column: Column) -> ColumnElement[Any]:
        if overrides is not None and column.name in overrides:
            return literal_column(overrides[column.name])
        return literal_column(f"{names[column.table]}.{column.name}")

    return resolve


def text_params(names: Mapping[str, str]) -> dict[str, ColumnElement[Any]]:
    """Call parameters as SQL text (`:amount_micros`), for text statements."""
    return {name: literal_column(sql) for name, sql in names.items()}


def postgres_text(
    expr: Expr, columns: Resolve, params: Mapping[str, ColumnElement[Any]] | None = None
) -> str:
    """`expr` as PostgreSQL text, its constants inlined."""
    compiled = to_sql(expr, columns, params).compile(
        dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
        compile_kwargs={"literal_binds": True},
    )
    return str(compiled)
