"""The `billing-service` command: serve, migrate."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError

from billing_service.config import ConfigError, load_price_table, load_settings
from billing_service.logs import configure_logging
from billing_service.security import load_authenticator, server_credentials
from billing_service.storage.migrations import migrate

_log = logging.getLogger("billing_service.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="billing-service",
        description="ai-billing: credit holds, exposure cap and usage records over gRPC. "
        "Configured by BILLING_* environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"billing-service {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server (migrates the database first)")
    commands.add_parser("migrate", help="create or upgrade the database schema, then exit")
    commands.add_parser("check-config", help="validate settings and the price table, then exit")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "check-config":
            prices = load_price_table(settings.price_table)
            load_authenticator(settings)
            server_credentials(settings)
            settings.page_token_key()
            if settings.webhook_port:
                from billing_service.payments.webhooks import load_webhook_secret

                load_webhook_secret(settings)
            print(f"configuration ok: {len(prices.models)} models priced")
        elif args.command == "migrate":
            asyncio.run(migrate(settings.database_url))
            print("database schema is up to date")
        else:
            from billing_service.app import serve

            asyncio.run(serve(settings))
    except ConfigError as error:
        print(f"billing-service: {error}", file=sys.stderr)
        return 2
    except (OSError, SQLAlchemyError) as error:
        # The database or a port is not there: one line for the operator, not a traceback.
        _log.debug("start failed", exc_info=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"billing-service: cannot {args.command}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("ai-billing")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
