"""The `billingctl` command line: arguments, the channel, and one exit code per outcome."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from billing.client import connect_channel
from billing.ctl import commands
from billing.ctl.errors import USAGE_EXIT, call_failure
from billing.ctl.money import parse_dollars
from billing.ctl.output import print_json_value
from billing.v1 import account_pb2, admin_pb2, types_pb2, usage_pb2

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0

_EPILOG = """\
Money is shown in dollars, exactly (no rounding); --json prints the protobuf JSON of the response,
money as integer micros (1 USD = 1,000,000). Times are UTC: --since/--until take a date
(2026-11-01) or a date and time (2026-11-01T12:00:00Z).

Exit codes: 0 done, 2 bad usage, 64 + the gRPC status code when the call failed (67
INVALID_ARGUMENT, 69 NOT_FOUND, 70 ALREADY_EXISTS, 73 FAILED_PRECONDITION, 78 UNAVAILABLE,
80 UNAUTHENTICATED).
"""


def run(argv: Sequence[str]) -> int:
    """Runs one command, printing to stdout and stderr; returns the process exit code."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.cert_file is None) != (args.key_file is None):
        parser.error("--cert-file and --key-file go together")
    request_id: str = args.request_id or f"ctl-{uuid.uuid4()}"
    try:
        channel = _connect(args)
    except OSError as error:
        err.write(f"billingctl: cannot read a TLS file: {error}\n")
        return USAGE_EXIT
    ctx = commands.Context(
        channel=channel,
        timeout_s=args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S,
        stream_timeout_s=args.timeout,
        request_id=request_id,
        json=args.json,
        out=out,
        binary_out=out.buffer,
    )
    handler: commands.Command = args.handler
    try:
        with channel:
            handler(ctx, args)
    except grpc.RpcError as error:
        failure = call_failure(error)
        # The outcome of a mutating call is unknown: its retry must send the same request id.
        retry_id = request_id if failure.retryable and args.mutating else None
        if args.json:
            print_json_value({"error": failure.as_json(), "retry_request_id": retry_id}, err)
            return failure.exit_code
        err.write(f"billingctl: {failure.in_dollars(args.dollar_options)}\n")
        if retry_id:
            err.write(
                f"billingctl: the outcome is unknown; retry with --request-id {retry_id} "
                "to get the first answer instead of doing it twice\n"
            )
        return failure.exit_code
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="billingctl",
        description="Operate a running ai-billing service: tenants, credit, usage, refunds.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser)
    parser.add_argument("--version", action="version", version=f"billingctl {_version()}")
    parser.set_defaults(**_connection_defaults())
    groups = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    # The options again on every command, so they may come before or after it; without
    # defaults, a command's parser keeps what was given before the command.
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common)

    tenants = _group(groups, "tenants", "create, change, read and list tenants")
    create = _command(
        tenants, "create", "create a tenant", commands.create_tenant, common, mutating=True
    )
    create.add_argument("tenant_id", metavar="TENANT")
    _tenant_settings(create)
    update = _command(
        tenants,
        "update",
        "change a tenant's settings (the others are kept)",
        commands.update_tenant,
        common,
        mutating=True,
    )
    update.add_argument("tenant_id", metavar="TENANT")
    _tenant_settings(update)
    get = _command(tenants, "get", "a tenant's settings and balance", commands.get_tenant, common)
    get.add_argument("tenant_id", metavar="TENANT")
    listing = _command(tenants, "list", "tenants, by id", commands.list_tenants, common)
    listing.add_argument(
        "--billing-status",
        type=_enum_value(types_pb2.BillingStatus, "BILLING_STATUS_"),
        default=types_pb2.BILLING_STATUS_UNSPECIFIED,
        metavar="STATUS",
        help="only tenants in this billing status: good-standing, payment-failed, "
        "action-required, disputed",
    )
    _paging(listing, default_limit=None)

    credit = _group(groups, "credit", "prepaid credit")
    grant = _command(
        credit,
        "grant",
        "add prepaid credit to a tenant",
        commands.grant_credit,
        common,
        mutating=True,
    )
    grant.add_argument("tenant_id", metavar="TENANT")
    _amount(grant, required=True)
    grant.add_argument("--reason", required=True, help="kept in the ledger")

    summary = _command(
        groups,
        "summary",
        "a tenant's credit, card and usage by model and by user",
        commands.summary,
        common,
    )
    summary.add_argument("tenant_id", metavar="TENANT")
    _period(summary, "(UTC midnights; default: this calendar month)")

    usage = _group(groups, "usage", "usage records")
    usage_list = _command(usage, "list", "usage records, newest first", commands.list_usage, common)
    usage_list.add_argument("tenant_id", metavar="TENANT")
    _period(usage_list, "")
    usage_list.add_argument("--model", default="", help="only this model")
    usage_list.add_argument("--user", default="", help="only this end user")
    _paging(usage_list, default_limit=50)
    export = _command(
        usage,
        "export",
        "a period's usage records as CSV, on stdout",
        commands.export_usage,
        common,
    )
    export.add_argument("tenant_id", metavar="TENANT")
    _period(export, "", required=True)

    ledger = _group(groups, "ledger", "the ledger (the statement)")
    ledger_list = _command(
        ledger, "list", "ledger entries, newest first", commands.list_ledger, common
    )
    ledger_list.add_argument("tenant_id", metavar="TENANT")
    _period(ledger_list, "")
    ledger_list.add_argument(
        "--kind",
        dest="kinds",
        action="append",
        default=[],
        type=_enum_value(usage_pb2.LedgerEntryKind, "LEDGER_ENTRY_KIND_"),
        help="only this kind (repeatable): grant, hold, release, expiry, debit, refund, "
        "top-up, top-up-reversal",
    )
    _paging(ledger_list, default_limit=50)

    holds = _group(groups, "holds", "open holds: credit kept for queries still running")
    hold_list = _command(
        holds, "list", "a tenant's open holds, oldest first", commands.list_open_holds, common
    )
    hold_list.add_argument("tenant_id", metavar="TENANT")
    hold_list.add_argument("--user", default="", help="only this end user's")
    hold_list.add_argument(
        "--api-key", default="", metavar="KEY", help="only those taken with this API key"
    )
    _paging(hold_list, default_limit=None)

    charges = _group(groups, "charges", "card charges (top-ups), and those waiting for an operator")
    charge_list = _command(
        charges, "list", "card charges, oldest first", commands.list_charges, common
    )
    charge_list.add_argument(
        "--status",
        type=_enum_value(account_pb2.ChargeStatus, "CHARGE_STATUS_"),
        default=account_pb2.CHARGE_STATUS_UNSPECIFIED,
        metavar="STATUS",
        help="only charges in this status: pending, succeeded, failed, action-required, "
        "refunded, unresolved (the ones waiting for an operator)",
    )
    charge_list.add_argument("--tenant", default="", metavar="TENANT", help="only this tenant's")
    _paging(charge_list, default_limit=None)
    resolve = _command(
        charges,
        "resolve",
        "record what Stripe did with a charge that has no outcome (checked against Stripe)",
        commands.resolve_charge,
        common,
        mutating=True,
    )
    resolve.add_argument("charge_id", metavar="CHARGE_ID")
    resolve.add_argument(
        "--outcome",
        required=True,
        type=_enum_value(admin_pb2.ChargeResolution, "CHARGE_RESOLUTION_"),
        help="succeeded (Stripe took the money: it is credited) or failed (it took nothing)",
    )
    resolve.add_argument(
        "--payment-intent",
        default="",
        metavar="PI",
        help="the PaymentIntent (pi_...) that took the money, or that was declined",
    )
    resolve.add_argument("--reason", required=True, help="why, e.g. a ticket number; logged")

    refund = _command(
        groups,
        "refund",
        "refund all (--all) or part (--amount) of a committed charge; never releases a hold",
        commands.refund,
        common,
        mutating=True,
    )
    refund.add_argument("reservation_id", metavar="RESERVATION_ID")
    _amount(refund, required=True, everything="--all")
    refund.add_argument("--reason", required=True, help="kept in the ledger, e.g. a ticket number")

    release = _command(
        groups,
        "release",
        "give an open hold back (nothing is charged); never refunds a committed charge",
        commands.release,
        common,
        mutating=True,
    )
    release.add_argument("reservation_id", metavar="RESERVATION_ID")
    release.add_argument("--reason", default="", help="kept in the ledger")
    return parser


def _connection_options(parser: argparse.ArgumentParser) -> None:
    # No defaults here: they are set once on the top parser (see _connection_defaults).
    default = argparse.SUPPRESS
    option = parser.add_argument_group("connection and output")
    option.add_argument(
        "--target",
        default=default,
        help=f"host:port of the service (env BILLING_TARGET; default {DEFAULT_TARGET})",
    )
    option.add_argument(
        "--token", default=default, help="bearer token of the operator role (env BILLING_TOKEN)"
    )
    option.add_argument(
        "--tls",
        action="store_true",
        default=default,
        help="use TLS, verifying the server against the system's roots",
    )
    option.add_argument(
        "--ca-file",
        type=Path,
        default=default,
        help="CA certificate (PEM) that signed the server's; implies --tls (env BILLING_CA_FILE)",
    )
    option.add_argument(
        "--cert-file",
        type=Path,
        default=default,
        help="client certificate (PEM) for mutual TLS; implies --tls (env BILLING_CERT_FILE)",
    )
    option.add_argument(
        "--key-file",
        type=Path,
        default=default,
        help="its private key (PEM) (env BILLING_KEY_FILE)",
    )
    option.add_argument(
        "--server-name",
        default=default,
        help="the name the server certificate must carry, when it differs from the target's host",
    )
    option.add_argument(
        "--timeout",
        type=_positive_float,
        default=default,
        help=f"seconds per call (default {DEFAULT_TIMEOUT_S:g}; usage export: no limit)",
    )
    option.add_argument(
        "--request-id",
        default=default,
        help="idempotency key of a mutating command (default: a new one); pass the one of a "
        "failed attempt to retry it safely",
    )
    option.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print the response as protobuf JSON, for scripts",
    )


def _connection_defaults() -> dict[str, object]:
    def path(name: str) -> Path | None:
        value = os.environ.get(name)
        return Path(value) if value else None

    return {
        "target": os.environ.get("BILLING_TARGET") or DEFAULT_TARGET,
        "token": os.environ.get("BILLING_TOKEN") or None,
        "tls": False,
        "ca_file": path("BILLING_CA_FILE"),
        "cert_file": path("BILLING_CERT_FILE"),
        "key_file": path("BILLING_KEY_FILE"),
        "server_name": None,
        "timeout": None,
        "request_id": None,
        "json": False,
        "mutating": False,
        # Field (e.g. amount_micros) -> the dollars option that gave it (e.g. --amount).
        "dollar_options": {},
    }


def _version() -> str:
    try:
        return importlib.metadata.version("ai-billing-client")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _connect(args: argparse.Namespace) -> grpc.Channel:
    """The channel the options describe; OSError when a certificate file cannot be read."""
    tls = bool(args.tls or args.ca_file or args.cert_file)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return connect_channel(
        args.target,
        token=args.token,
        root_certificates=_read(args.ca_file),
        certificate_chain=_read(args.cert_file),
        private_key=_read(args.key_file),
        tls=tls,
        options=options,
    )


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _group(groups: Subparsers, name: str, help_text: str) -> Subparsers:
    parser: argparse.ArgumentParser = groups.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(title="commands", required=True, metavar="COMMAND")


def _command(
    groups: Subparsers,
    name: str,
    help_text: str,
    handler: commands.Command,
    common: argparse.ArgumentParser,
    *,
    mutating: bool = False,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = groups.add_parser(
        name, help=help_text, description=help_text, parents=[common]
    )
    parser.set_defaults(handler=handler, mutating=mutating)
    return parser


def _tenant_settings(parser: argparse.ArgumentParser) -> None:
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--credit-limit",
        dest="credit_limit_micros",
        type=_dollars,
        action=_InDollars,
        metavar="DOLLARS",
        help="credit limit while a payment method is on file, e.g. 25.00",
    )
    limit.add_argument(
        "--credit-limit-micros",
        dest="credit_limit_micros",
        type=_micros,
        metavar="MICROS",
        help="the same in micros",
    )
    parser.add_argument(
        "--status",
        type=_enum_value(admin_pb2.TenantStatus, "TENANT_STATUS_"),
        default=admin_pb2.TENANT_STATUS_UNSPECIFIED,
        help="active or suspended",
    )
    parser.add_argument(
        "--payment-method",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether a payment method is on file (it extends the credit limit)",
    )


def _amount(parser: argparse.ArgumentParser, *, required: bool, everything: str = "") -> None:
    """--amount DOLLARS or --amount-micros MICROS; with `everything` (e.g. "--all") also that
    flag as the third choice, and then the amount must be positive: an amount of 0 would be
    neither."""
    amount = parser.add_mutually_exclusive_group(required=required)
    amount.add_argument(
        "--amount",
        dest="amount_micros",
        type=_positive(_dollars) if everything else _dollars,
        action=_InDollars,
        metavar="DOLLARS",
        help="in dollars, e.g. 10.50",
    )
    amount.add_argument(
        "--amount-micros",
        dest="amount_micros",
        type=_positive_int if everything else _micros,
        metavar="MICROS",
        help="the same in micros",
    )
    if everything:
        amount.add_argument(
            everything, dest="everything", action="store_true", help="all that is left of it"
        )


def _period(parser: argparse.ArgumentParser, note: str, *, required: bool = False) -> None:
    parser.add_argument(
        "--since",
        type=_moment,
        required=required,
        metavar="TIME",
        help=f"start of the period, inclusive {note}".rstrip(),
    )
    parser.add_argument(
        "--until",
        type=_moment,
        required=required,
        metavar="TIME",
        help=f"end of the period, exclusive {note}".rstrip(),
    )


def _paging(parser: argparse.ArgumentParser, *, default_limit: int | None) -> None:
    shown = "all" if default_limit is None else str(default_limit)
    parser.add_argument(
        "--limit", type=_positive_int, default=default_limit, help=f"at most this many ({shown})"
    )
    parser.add_argument(
        "--page-token", default="", help="continue where a listing with --limit stopped"
    )


class _InDollars(argparse.Action):
    """Stores the amount (in micros) and which dollars option gave it, so that an error about
    it is told in dollars too (see errors.CallFailure.in_dollars)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        # A command's own namespace lacks the top parser's defaults until they are merged.
        given = getattr(namespace, "dollar_options", {})
        namespace.dollar_options = {**given, self.dest: option_string}


# Argument types: each raises ValueError / ArgumentTypeError, which argparse reports as usage.


def _dollars(text: str) -> int:
    try:
        return parse_dollars(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(parse: Callable[[str], int]) -> Callable[[str], int]:
    def positive(text: str) -> int:
        value = parse(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"not a positive amount: {text!r}")
        return value

    return positive


def _micros(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number of micros: {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _moment(text: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date or time (e.g. 2026-11-01 or 2026-11-01T12:00:00Z): {text!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class _EnumValue:
    """Parses `payment-failed` into the enum's number, from the enum's own names."""

    def __init__(self, names: dict[str, int], what: str) -> None:
        self._names = names
        self.__name__ = what  # argparse names the type in its error message

    def __call__(self, text: str) -> int:
        value = self._names.get(text.strip().lower().replace("_", "-"))
        if value is None:
            choices = ", ".join(self._names)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of: {choices}")
        return value


def _enum_value(enum: object, prefix: str) -> _EnumValue:
    names: dict[str, int] = {
        name.removeprefix(prefix).lower().replace("_", "-"): number
        for name, number in enum.items()  # type: ignore[attr-defined]
        if number != 0
    }
    return _EnumValue(names, prefix.rstrip("_").lower())
