"""The ``postgres_server`` fixture gives a server on which tests can create and use databases."""

from __future__ import annotations

import uuid

import asyncpg
from sqlalchemy.engine import make_url

from tests.support.postgres import PostgresServer


async def test_create_database_and_connect(postgres_server: PostgresServer) -> None:
    name = f"support_{uuid.uuid4().hex[:12]}"

    url = make_url(postgres_server.create_database(name))

    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+asyncpg",
        postgres_server.host,
        postgres_server.port,
        name,
    )
    conn = await asyncpg.connect(
        host=postgres_server.host, port=postgres_server.port, user="postgres", database=name
    )
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == name
    finally:
        await conn.close()
