"""The pgbench floor runs the service's own statements: bench/pgbench/reserve_commit.sql is
generated from storage/postgres_hot_path.py, and the committed copy is that text."""

from __future__ import annotations

import re

from bench import pgbench_script
from billing_service.storage import postgres_hot_path


def test_the_committed_script_is_the_generated_one() -> None:
    assert pgbench_script.is_current(), "run python -m bench.pgbench_script"


def test_every_statement_parameter_has_a_pgbench_expression() -> None:
    rendered = pgbench_script.render()
    for statement in (postgres_hot_path.RESERVE.text, postgres_hot_path.COMMIT.text):
        # The statements' own text, bar the parameters, is in the script unchanged.
        for piece in re.split(r"(?<![:\w]):\w+", statement):
            assert piece.strip() in rendered
