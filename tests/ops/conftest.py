"""Fixtures for the operational tests: in-process servers with given settings, test prices."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from billing_service.app import Application
from billing_service.config import Settings

# One output token costs one micro: amounts in tests are exact and easy to read.
UNIT_PRICES = """
[models."unit-priced"]
billing = "metered"
output_micros_per_mtok = 1_000_000
"""

RunningServer = Callable[..., AbstractAsyncContextManager[Application]]


@pytest.fixture
def unit_prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(UNIT_PRICES)
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"


@pytest.fixture
def running_server(sqlite_url: str, unit_prices: Path) -> RunningServer:
    """`async with running_server(**settings) as app:` a real server on a free port (SQLite by
    default), stopped without grace at the end."""

    @asynccontextmanager
    async def start(interceptors: Any = (), **overrides: Any) -> AsyncIterator[Application]:
        values: dict[str, Any] = {
            "database_url": sqlite_url,
            "listen_address": "127.0.0.1:0",
            "price_table": unit_prices,
            "log_format": "text",
        }
        values.update(overrides)
        app = await Application.start(Settings(**values), interceptors=interceptors)
        try:
            yield app
        finally:
            await app.stop(grace_s=0)

    return start
