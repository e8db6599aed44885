"""Settings from the environment (prefix BILLING_), and the price table they point at.

Every setting is documented in the README's configuration table. Durations are seconds; money is
micros.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from importlib import resources
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from billing_service.core import CoreSettings
from billing_service.domain.commands import TtlBounds
from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.pricing import PriceTable, PriceTableError, parse_price_table

_SUPPORTED_DRIVERS = frozenset({"sqlite+aiosqlite", "postgresql+asyncpg"})


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite+aiosqlite:///billing.db",
        description="SQLAlchemy URL. Default: a SQLite file in the working directory. "
        "PostgreSQL: postgresql+asyncpg://user:password@host:5432/billing",
    )
    listen_address: str = Field("127.0.0.1:50051", description="host:port the gRPC server binds.")
    price_table: Path | None = Field(
        None, description="Path of the TOML price table. Default: the shipped default_prices.toml."
    )
    auto_create_tenants: bool = Field(
        True, description="Create an unknown tenant on its first call (false: NOT_FOUND)."
    )
    default_credit_limit_micros: int = Field(
        25_000_000, ge=0, le=AMOUNT_MICROS_MAX, description="Credit limit of a new tenant."
    )
    hold_ttl_default_s: int = Field(300, ge=1, description="Default time to live of a hold.")
    hold_ttl_min_s: int = Field(1, ge=1, description="Shortest time to live a call may ask.")
    hold_ttl_max_s: int = Field(3600, ge=1, description="Longest time to live a call may ask.")
    expiry_sweep_interval_s: float = Field(
        1.0, gt=0, description="How often expired holds are looked for and released."
    )
    migrate_on_start: bool = Field(True, description="Run the schema migrations when serving.")
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    db_pool_size: int = Field(10, ge=1, le=500, description="PostgreSQL connections per process.")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, url: str) -> str:
        try:
            driver = make_url(url).drivername
        except ArgumentError:
            raise ValueError("not a SQLAlchemy database URL") from None
        if driver not in _SUPPORTED_DRIVERS:
            raise ValueError(f"use one of {', '.join(sorted(_SUPPORTED_DRIVERS))}, not {driver}")
        return url

    @model_validator(mode="after")
    def _ttl_bounds_ordered(self) -> Settings:
        if not self.hold_ttl_min_s <= self.hold_ttl_default_s <= self.hold_ttl_max_s:
            raise ValueError(
                "hold TTLs must satisfy BILLING_HOLD_TTL_MIN_S <= BILLING_HOLD_TTL_DEFAULT_S "
                "<= BILLING_HOLD_TTL_MAX_S"
            )
        return self

    def core_settings(self) -> CoreSettings:
        return CoreSettings(
            default_credit_limit_micros=self.default_credit_limit_micros,
            auto_create_tenants=self.auto_create_tenants,
            ttl_bounds=TtlBounds(
                default=timedelta(seconds=self.hold_ttl_default_s),
                minimum=timedelta(seconds=self.hold_ttl_min_s),
                maximum=timedelta(seconds=self.hold_ttl_max_s),
            ),
        )


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        variable = f"BILLING_{where.upper()}" if where != "settings" else where
        raise ConfigError(f"invalid configuration: {variable}: {first['msg']}") from None


def load_price_table(path: Path | None) -> PriceTable:
    try:
        if path is None:
            text = resources.files("billing_service").joinpath("default_prices.toml").read_text()
        else:
            text = path.read_text()
        return parse_price_table(tomllib.loads(text))
    except OSError as error:
        raise ConfigError(f"cannot read the price table {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"the price table {path} is not valid TOML: {error}") from None
    except PriceTableError as error:
        raise ConfigError(f"the price table {path or 'default'} is invalid: {error}") from None
