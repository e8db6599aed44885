"""Settings from the environment (prefix BILLING_), and the price table they point at.

Every setting is documented in the README's configuration table. Durations are seconds; money is
micros.
"""

from __future__ import annotations

import logging
import tomllib
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from billing_service.core import CoreSettings
from billing_service.domain.commands import TtlBounds
from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.payments import MICROS_PER_CENT, TOP_UP_MICROS_MIN
from billing_service.domain.pricing import PriceTable, PriceTableError, parse_price_table

_SUPPORTED_DRIVERS = frozenset({"sqlite+aiosqlite", "postgresql+asyncpg"})
PAGE_TOKEN_SECRET_MIN = 32


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BILLING_", extra="ignore", frozen=True, populate_by_name=True
    )

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
    books_audit_interval_s: float = Field(
        300.0,
        ge=0,
        description="How often every tenant's books are audited against the ledger; 0 turns "
        "the audit off.",
    )
    migrate_on_start: bool = Field(True, description="Run the schema migrations when serving.")
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    db_pool_size: int = Field(10, ge=1, le=500, description="PostgreSQL connections per process.")
    db_coalesce_writes: bool = Field(
        False,
        description="PostgreSQL: send ReserveCredit and Commit calls that arrive together as one "
        "round trip.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json: one JSON object per line; text: for a terminal; auto: text "
        "when stderr is a terminal, else json.",
    )
    access_log: bool = Field(True, description="Log one line per finished call (INFO).")

    # Security. With neither tokens nor a client CA, callers are not authenticated.
    auth_tokens: SecretStr | None = Field(
        None, description="Bearer tokens as role=token entries, separated by commas or spaces."
    )
    auth_tokens_file: Path | None = Field(
        None, description="A file of role=token lines (# comments); joins BILLING_AUTH_TOKENS."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the server.")
    tls_key_file: Path | None = Field(None, description="PEM private key of the server.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, every client must present a certificate."
    )
    tls_client_roles: str = Field(
        "", description="role=identity entries: a client certificate's CN or SAN -> role."
    )

    # Page tokens (AIP-158) are signed so that only tokens this service made are accepted.
    page_token_secret: SecretStr | None = Field(
        None,
        description="Key that signs page tokens, at least 32 characters, the same on every "
        "replica. Unset: a random key the migrations stored in the database.",
    )
    page_token_secret_file: Path | None = Field(
        None, description="A file holding the page-token key, instead of the variable."
    )

    # Transport limits.
    health_listen_address: str = Field(
        "", description="host:port of a plaintext listener serving only grpc.health.v1."
    )
    max_message_bytes: int = Field(
        1_048_576, ge=1024, le=64 * 1_048_576, description="Largest message received or sent."
    )
    keepalive_time_s: float = Field(60.0, gt=0, description="Ping an idle connection this often.")
    keepalive_timeout_s: float = Field(
        20.0, gt=0, description="Close a connection whose ping is not answered in this time."
    )
    keepalive_min_client_interval_s: float = Field(
        10.0, gt=0, description="Clients may ping this often without being disconnected."
    )
    max_connection_age_s: float = Field(
        0.0, ge=0, description="Close connections after this long (0: never)."
    )

    # Observability and readiness.
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus HTTP port (0: off).")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port binds.")
    health_check_interval_s: float = Field(
        5.0, gt=0, description="How often the database is checked for readiness."
    )
    health_check_timeout_s: float = Field(
        2.0, gt=0, description="A readiness check slower than this counts as a failure."
    )
    tracing: Literal["off", "otlp", "console"] = Field(
        "off", description="OpenTelemetry spans of every call: off, otlp, console."
    )

    # Stripe webhooks (off unless a port is set).
    webhook_port: int = Field(
        0, ge=0, le=65535, description="HTTP port of the Stripe webhook endpoint (0: off)."
    )
    webhook_host: str = Field("127.0.0.1", description="Address the webhook port binds.")
    webhook_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A delivery's headers must arrive within this time of connecting, and its "
        "body within this time after them; a slower client is disconnected.",
    )
    webhook_max_connections: int = Field(
        100, ge=1, le=10_000, description="Most open webhook connections; more are answered 503."
    )
    stripe_webhook_secret: SecretStr | None = Field(
        None, description="The webhook endpoint's signing secret (whsec_...)."
    )
    stripe_webhook_secret_file: Path | None = Field(
        None,
        description="A file holding the signing secret, instead of BILLING_STRIPE_WEBHOOK_SECRET.",
    )
    stripe_webhook_tolerance_s: int = Field(
        300, ge=1, description="Oldest signature timestamp accepted, in seconds before now."
    )
    stripe_webhook_timeout_s: float = Field(
        10.0, gt=0, description="An event not processed in this time is answered 503 (redelivered)."
    )

    # Stripe. Without a key the service runs without card payments.
    stripe_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("BILLING_STRIPE_API_KEY", "STRIPE_API_KEY"),
        description="Stripe secret key (sk_...); also read from STRIPE_API_KEY.",
    )
    stripe_api_key_file: Path | None = Field(
        None, description="A file holding the Stripe secret key (e.g. a mounted secret)."
    )
    stripe_api_base: str | None = Field(
        None, description="Stripe API URL override (tests point it at localstripe)."
    )
    stripe_currency: str = Field("usd", description="Currency of every charge.")
    stripe_requests_per_second: float = Field(
        20.0, gt=0, le=100, description="Most Stripe API calls per second from one process."
    )
    auto_top_up_threshold_micros: int = Field(
        5_000_000, ge=0, le=AMOUNT_MICROS_MAX, description="Default automatic top-up threshold."
    )
    auto_top_up_amount_micros: int = Field(
        20_000_000,
        ge=TOP_UP_MICROS_MIN,
        le=AMOUNT_MICROS_MAX,
        multiple_of=MICROS_PER_CENT,
        description="Default automatic top-up amount (whole cents).",
    )
    auto_top_up_monthly_limit_micros: int | None = Field(
        None,
        ge=0,
        le=AMOUNT_MICROS_MAX,
        description=(
            "Default monthly ceiling of automatic top-ups per tenant; unset: 10 times the "
            "tenant's top-up amount."
        ),
    )
    charge_worker_interval_s: float = Field(
        5.0, gt=0, description="How often the charge worker looks for due top-ups and charges."
    )
    charge_lease_s: float = Field(
        60.0,
        gt=0,
        description=(
            "How long a worker owns a charge before another may retry it; one Stripe call for "
            "a charge gives up after half of it."
        ),
    )
    charge_worker_concurrency: int = Field(
        8, ge=1, le=256, description="The most charges one process sends to Stripe at once."
    )
    on_demand_top_up: bool = Field(
        True, description="A ReserveCredit without room waits for a top-up of a card on file."
    )
    reconcile_interval_s: float = Field(
        3600.0, gt=0, description="How often cards on file and stale charges are re-read."
    )

    @field_validator(
        "auth_tokens_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "stripe_webhook_secret_file",
        "stripe_api_key_file",
        "page_token_secret_file",
        mode="before",
    )
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("stripe_webhook_secret", "page_token_secret", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        if not isinstance(logging.getLevelNamesMapping().get(level.upper()), int):
            raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level.upper()

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

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both BILLING_TLS_CERT_FILE and BILLING_TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("BILLING_TLS_CLIENT_CA_FILE needs BILLING_TLS_CERT_FILE (mutual TLS)")
        if self.tls_client_roles.strip() and self.tls_client_ca_file is None:
            raise ValueError("BILLING_TLS_CLIENT_ROLES needs BILLING_TLS_CLIENT_CA_FILE")
        return self

    @model_validator(mode="after")
    def _webhook_secret_given(self) -> Settings:
        given = (self.stripe_webhook_secret is not None) + (
            self.stripe_webhook_secret_file is not None
        )
        if given == 2:
            raise ValueError(
                "set BILLING_STRIPE_WEBHOOK_SECRET or BILLING_STRIPE_WEBHOOK_SECRET_FILE, not both"
            )
        if self.webhook_port and not given:
            raise ValueError(
                "BILLING_WEBHOOK_PORT needs BILLING_STRIPE_WEBHOOK_SECRET or "
                "BILLING_STRIPE_WEBHOOK_SECRET_FILE (the endpoint's signing secret)"
            )
        return self

    @model_validator(mode="after")
    def _one_page_token_secret(self) -> Settings:
        if self.page_token_secret is not None and self.page_token_secret_file is not None:
            raise ValueError(
                "set BILLING_PAGE_TOKEN_SECRET or BILLING_PAGE_TOKEN_SECRET_FILE, not both"
            )
        if (
            self.page_token_secret is not None
            and len(self.page_token_secret.get_secret_value().strip()) < PAGE_TOKEN_SECRET_MIN
        ):
            raise ValueError(
                f"BILLING_PAGE_TOKEN_SECRET must be at least {PAGE_TOKEN_SECRET_MIN} characters"
            )
        return self

    def page_token_key(self) -> bytes | None:
        """The configured page-token key; None: the one stored in the database."""
        if self.page_token_secret is not None:
            return self.page_token_secret.get_secret_value().strip().encode()
        if self.page_token_secret_file is None:
            return None
        where = f"BILLING_PAGE_TOKEN_SECRET_FILE {self.page_token_secret_file}"
        try:
            secret = self.page_token_secret_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{where}: cannot read it: {error.strerror}") from None
        if len(secret) < PAGE_TOKEN_SECRET_MIN:
            raise ConfigError(
                f"{where}: the key must be at least {PAGE_TOKEN_SECRET_MIN} characters"
            )
        return secret.encode()

    def stripe_key(self) -> str | None:
        """The Stripe secret key, from the environment or the mounted file; None: no Stripe."""
        if self.stripe_api_key is not None and self.stripe_api_key.get_secret_value():
            return self.stripe_api_key.get_secret_value().strip()
        if self.stripe_api_key_file is None:
            return None
        try:
            key = self.stripe_api_key_file.read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"cannot read BILLING_STRIPE_API_KEY_FILE {self.stripe_api_key_file}: "
                f"{error.strerror}"
            ) from None
        return key or None

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
