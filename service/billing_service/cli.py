"""The `billing-service` command: serve, migrate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from billing_service.config import ConfigError, load_price_table, load_settings
from billing_service.storage.migrations import migrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="billing-service",
        description="ai-billing: credit holds, exposure cap and usage records over gRPC. "
        "Configured by BILLING_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server (migrates the database first)")
    commands.add_parser("migrate", help="create or upgrade the database schema, then exit")
    commands.add_parser("check-config", help="validate settings and the price table, then exit")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        if args.command == "check-config":
            prices = load_price_table(settings.price_table)
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
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
